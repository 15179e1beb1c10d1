"""The `search` subcommand (research line 1): each variant's depth search, its trials trained here or on Ray, and
its reports: results.csv (trial by trial, so the same command continues a killed search), results.md, the plot of
validation error against depth, and the W&B tables. The search itself is `depth_search`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.loggers import WandbLogger
from torch import nn

from lightning_modules.errors import ConfigError, DivergenceError, require
from lightning_modules.run.files import atomic_savefig, atomic_write
from lightning_modules.run.run_folder import training_differences
from lightning_modules.studies.depth_search import (
    SearchResult,
    Trial,
    TrialLog,
    confirmation,
    describe,
    run_searches,
    search_plan,
    trial_outcome,
    trials_needed,
    write_trials,
)
from lightning_modules.studies.grouped_trials import grouping_refusal, train_grouped
from lightning_modules.studies.propagate import check_depths, depth_nets, probe, trainable_depth
from lightning_modules.studies.study import Study, StudyFiles
from lightning_modules.studies.trials import TrialRuns, bare_trainer, portable, quiet_lightning, worker_device

FILES = StudyFiles(progress="results.csv", final="results.md")
# the deepest trainable k the original notebook found (spec 01's table), by config name
ORIGINAL_DEPTHS = {
    "tanh": 3,
    "tanh_init": 84,
    "elu": 93,
    "elu_bn": 156,
    "resnet": 447,
    "tanh_bn": 96,
    "resnet_nobn": 12,
}
PLOT = "error_vs_depth.png"


def write_results(
    results: list[SearchResult], max_error: float, folder: Path, predictions: dict[str, str] | None = None
) -> dict[str, Path]:
    """Write results.csv, results.md (per-trial table and per-variant summary, with each variant's `predictions`
    when the search started from them) and error_vs_depth.png."""
    folder.mkdir(parents=True, exist_ok=True)
    trials = [t for r in results for t in r.trials]
    paths = {"csv": folder / FILES.progress, "md": folder / FILES.final, "plot": folder / PLOT}
    write_trials(trials, paths["csv"])
    lines = [
        f"Trainable: mean validation error over seeds below {max_error:.0%}. Trials: those this search trained, and "
        "those the other way (binary search, or starting from the prediction) would train for the same boundary.",
        "",
        "| variant | search upper bound | predicted k | max trainable k | original k | confirmed | trials "
        "| binary search | from prediction | trials' time |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        seeds = max(1, len({t.seed for t in r.trials if t.phase == "search"}))
        confirm_seeds = len({t.seed for t in r.trials if t.phase == "confirm"}) or None
        predicted = (predictions or {}).get(r.variant, "")
        binary = trials_needed(r.upper, r.deepest, seeds, confirm_seeds=confirm_seeds)
        guided = (
            trials_needed(r.upper, r.deepest, seeds, guess=r.guess, confirm_seeds=confirm_seeds)
            if r.guess is not None
            else ""
        )
        original = ORIGINAL_DEPTHS.get(r.variant.rsplit("/", 1)[-1], "")
        lines.append(
            f"| {r.variant} | {r.upper} | {predicted} | {r.deepest or 'none'} | {original} "
            f"| {confirmation(r)} | {len(r.trials)} | {binary} | {guided} | {trials_time(r.trials)} |"
        )
    lines += [
        "",
        "| variant | k | seed | train err | val err | trainable | phase | note |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    lines += [
        f"| {t.variant} | {t.depth} | {t.seed} | {t.train_err:.4f} | {t.val_err:.4f} | {'yes' if t.trainable else 'no'} "
        f"| {t.phase} | {'' if not math.isnan(t.val_err) else trial_outcome(t).replace('|', '/')} |"
        for t in sorted(trials, key=lambda t: (t.variant, t.depth, t.phase, t.seed))
    ]
    atomic_write(paths["md"], "\n".join(lines) + "\n")
    plot_errors(results, max_error, paths["plot"])
    return paths


def trials_time(trials: list[Trial]) -> str:
    """The trials' wall times added up (`42.5 min`); empty when a trial's time was not recorded (older results)."""
    seconds = sum(t.seconds for t in trials)
    return "" if math.isnan(seconds) else f"{seconds / 60:.1f} min"


def plot_errors(results: list[SearchResult], max_error: float, path: Path):
    """Validation error against depth, one colour per variant; diverged (x) and failed (square) trials, which have no
    error, drawn at error 1 and marked apart. The depth axis has a tick at each probed depth (at most 10; else whole
    numbers). Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    unmeasured = {"diverged": "x", "failed": "s"}
    for i, r in enumerate(results):
        trained = sorted((t.depth, t.val_err) for t in r.trials if _kind(t) == "trained")
        found = f"k*={r.deepest}" if r.deepest else "no depth trainable"
        ax.plot([d for d, _ in trained], [e for _, e in trained], "o", color=f"C{i}", alpha=0.7,
                label=f"{r.variant} ({found})")  # fmt: skip
        for kind, marker in unmeasured.items():
            depths = sorted(t.depth for t in r.trials if _kind(t) == kind)
            if depths:  # "_": not in the legend, which has one entry per kind below
                ax.plot(depths, [1.0] * len(depths), marker, color=f"C{i}", alpha=0.7, label=f"_{kind} {r.variant}")
    for kind, marker in unmeasured.items():  # one legend entry per kind, in no variant's colour
        if any(_kind(t) == kind for r in results for t in r.trials):
            ax.plot([], [], marker, color="grey", label=f"{kind} (drawn at error 1)")
    ax.axhline(max_error, color="grey", linestyle="--", label=f"threshold {max_error:.0%}")
    depths = sorted({t.depth for r in results for t in r.trials})
    if 0 < len(depths) <= 10:
        ax.set_xticks(depths)
        ax.set_xlim(depths[0] - 3, depths[-1] + 3)  # a single depth gets room either side, not 2.85 to 3.15
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(
        xlabel="depth k (conv layers)",
        ylabel="validation error after training",
        ylim=(0, 1.02),
        title="Trainability against depth",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return fig


def _kind(trial: Trial) -> str:
    """`trained`, `diverged` (NaN, no error) or `failed` (crashed twice)."""
    return "failed" if trial.error else "diverged" if math.isnan(trial.val_err) else "trained"


@dataclass
class DepthTrial:
    """The depth search's trials: `trial(variant, depth, seed)` trains that variant's net rebuilt at `depth`
    from `seed`, as `fit --seed_everything seed` would, and returns (train error, validation error), NaN
    when the loss diverged. One object for every variant, so a launcher sends the data once."""

    nets: dict[str, nn.Module]
    template: pl.LightningModule
    datamodule: pl.LightningDataModule
    epochs: int
    steps: int | None = None
    precision: str | int | None = None
    device: str | None = None  # "cpu" or "cuda:N"; None: the worker's GPU when it was given one, else the CPU
    runs: TrialRuns | None = None

    def __call__(self, variant: str, depth: int, seed: int) -> tuple[float, float]:
        """(training error, validation error) of the trained net, both measured after its last step in evaluation
        mode (the training error over the whole training split, not the running mean of its last batches)."""
        pl.seed_everything(seed, verbose=False)
        model = copy.deepcopy(self.template)
        model.net = self.nets[variant].at_depth(depth)
        device = worker_device(self.device)
        run = None
        if self.runs is not None:
            config = {"variant": variant, "depth": depth, "seed": seed, "epochs": self.epochs, "steps": self.steps}
            run = self.runs.start(f"{variant} k={depth} seed={seed}", config)
        with quiet_lightning():
            trainer = bare_trainer(
                -1 if self.steps else self.epochs,
                max_steps=self.steps or -1,
                accelerator="gpu" if device.type == "cuda" else "cpu",
                devices=[device.index or 0] if device.type == "cuda" else 1,
                precision=self.precision,
                logger=WandbLogger(experiment=run) if run is not None else False,
            )
            errors = None
            try:
                trainer.fit(model, datamodule=self.datamodule)
                if self.steps:  # a step budget can end inside an epoch, after its last validation
                    trainer.validate(model, datamodule=self.datamodule, verbose=False)
                val_err = float(trainer.callback_metrics["val/err"])
                errors = error_rate(trainer, model, self.datamodule.eval_dataloader("train")), val_err
            except DivergenceError:  # NaN, infinite or exploded loss: counted as diverged
                errors = math.nan, math.nan
            finally:
                if run is not None:  # a crashed trial's run is marked failed
                    if errors is not None:
                        run.summary.update({"train_err": errors[0], "val_err": errors[1]})
                    run.finish(exit_code=0 if errors is not None else 1)
        return errors

    def group(self, variant: str, depth: int, seeds: list[int]) -> list[tuple[float, float]]:
        """The trials of `seeds` at one depth trained together as one grouped net (`grouped_trials`), each as
        `self(variant, depth, seed)` trains it, up to float rounding; their W&B runs are written when they finish."""
        members = []
        for seed in seeds:
            pl.seed_everything(seed, verbose=False)
            members.append(self.nets[variant].at_depth(depth))
        device = worker_device(self.device)
        fit = train_grouped(self.template, members, seeds, self.datamodule, self.epochs, self.steps, device,
                            self.precision, history=self.runs is not None)  # fmt: skip
        if self.runs is not None:
            for seed, (train_err, val_err), history in zip(seeds, fit.outcomes, fit.history, strict=True):
                config = {"variant": variant, "depth": depth, "seed": seed, "epochs": self.epochs, "steps": self.steps,
                          "grouped_with": seeds}  # fmt: skip
                summary = {"train_err": train_err, "val_err": val_err}
                self.runs.log_finished(f"{variant} k={depth} seed={seed}", config, history, summary)
        return fit.outcomes


# what a trial's result depends on, beside its variant, depth and seed: an earlier search that differs in one of these
# trained other trials (where its data lie on disk does not count)
TRIAL_SETTINGS = (
    *("seed_everything", "model", "data", "budget", "epochs", "trainer.max_steps", "trainer.precision"),
    *("trainer.accumulate_grad_batches", "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm"),
)


def earlier_trials(folder: Path, config: Path) -> TrialLog:
    """The trials of the earlier search in run folder `folder` (its results.csv), refused in one line when its
    config.yaml differs from this search's `config` in what trains a trial (TRIAL_SETTINGS), or is missing."""
    if folder.name == FILES.progress:  # its results.csv named instead of its folder
        folder = folder.parent
    results, saved = folder / FILES.progress, folder / "config.yaml"
    for path in (results, saved):
        if not path.is_file():
            raise ConfigError(f"--trials_from {folder}: no {path.name} there (a search's run folder has both)")
    listed = training_differences(yaml.safe_load(saved.read_text()) or {}, yaml.safe_load(config.read_text()) or {},
                                  TRIAL_SETTINGS)  # fmt: skip
    if listed:
        raise ConfigError(f"--trials_from {folder}: that search trained its trials otherwise (it differs in {listed})")
    return TrialLog(results)


def group_trials(asked: bool, refusal: str | None, seeds: int) -> bool:
    """Whether a probe's seeds train grouped: as `--group_seeds` asks, refused in one line where the settings do not
    allow it."""
    if asked and refusal:
        raise ConfigError(f"--group_seeds true: the seeds cannot train as one grouped net here ({refusal})")
    if seeds > 1:
        print(f"search: the seeds of a depth train {'together, as one grouped net' if asked else 'one at a time'}")
    return asked


def error_rate(trainer: pl.Trainer, model: pl.LightningModule, loader) -> float:
    """The fraction of a loader's samples that a trained model gets wrong, in evaluation mode, at the trainer's
    precision and on its device."""
    wrong = torch.zeros((), dtype=torch.long, device=model.device)
    total = 0
    model.eval()
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        for x, y in loader:
            x, y = trainer.precision_plugin.convert_input(x.to(model.device)), y.to(model.device)  # 64-true: float64
            wrong += (model(x).argmax(dim=1) != y).sum()
            total += len(y)
    return int(wrong) / max(total, 1)


def run_search(
    study: Study,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    upper: int | None,
    seeds: int,
    epochs: int,
    max_error: float,
    variants: dict[str, int] | None,
    launcher: str,
    ray_address: str | None,
    cpus_per_trial: float,
    trials_per_gpu: int,
    bracket: str = "binary",
    probe_depth: int = 96,
    confirm_seeds: int | None = None,
    trials_from: str | None = None,
    group_seeds: bool = False,
) -> list[SearchResult]:
    """The `search` subcommand (its arguments are documented on the Trainer's method): every variant's search, its
    trials on the launcher, recorded as they finish; then results.csv, results.md, the plot and the W&B tables."""
    study.require_one_process("each trial trains on one device; --launcher ray trains trials in parallel")
    study.refuse_unhonoured(honoured=("precision", "max_steps"))
    if not callable(getattr(datamodule, "eval_dataloader", None)):  # each trial's error on its training split
        raise ConfigError(f"search needs one of the in-memory datamodules; {type(datamodule).__name__} is not")
    require("positive", seeds=seeds, epochs=epochs, cpus_per_trial=cpus_per_trial)
    if confirm_seeds is not None:
        require("positive", confirm_seeds=confirm_seeds)
    require("probability", max_error=max_error)
    require("non_negative", trials_per_gpu=trials_per_gpu)
    for name, bound in [("upper", upper), *(variants or {}).items()]:
        if bound is not None and bound < 3:
            raise ConfigError(
                f"{name}: the search's upper bound must be at least 3 (the shallowest depth), got {bound}"
            )
    if not variants and upper is None:
        raise ConfigError("search needs --upper (the largest depth to try) or --variants")
    jobs = depth_nets(study, model, variants, upper)
    first_seed = pl.seed_everything(verbose=False)  # the run's seed (seed_everything in the config)
    trainer = study.trainer
    steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
    length = f"{steps} steps" if steps else f"{epochs} epochs"
    start = time.perf_counter()
    log = TrialLog(study.folder / FILES.progress)  # a killed search's trials
    if log.trials:
        print(f"search: {len(log.trials)} trial(s) already in {log.path}, not trained again")
    if trials_from is not None:
        earlier = earlier_trials(Path(trials_from), study.folder / "config.yaml")
        names = {t.variant for t in earlier.trials.values()}
        # one net searched in both: its trials are this search's whatever the earlier run was named
        rename = {names.pop(): jobs[0][0]} if not variants and len(names) == 1 else None
        taken = log.take(earlier, rename)
        print(f"search: {taken} trial(s) taken from {trials_from}, not trained again")
    known = set(log.trials)
    if bracket not in ("binary", "predicted"):
        raise ConfigError(f"bracket must be 'binary' or 'predicted', got {bracket!r}")
    if bracket == "predicted":
        check_depths([probe_depth])
    refusal = grouping_refusal(model, [net for _, net, _ in jobs], datamodule, trainer)
    grouped = group_trials(group_seeds, refusal, max(seeds, confirm_seeds or seeds))  # before any trial or probe
    guesses, predictions = {}, {}
    with study.trials(datamodule, launcher, ray_address, cpus_per_trial, trials_per_gpu) as (runner, where):
        if bracket == "predicted":  # the untrained nets' signal propagation, seconds per variant
            for name, net, bound in jobs:
                seeds_ = list(range(first_seed, first_seed + 3))
                prediction = probe(name, net, datamodule, [probe_depth], seeds_, 32, trainer.strategy.root_device)
                guesses[name], predictions[name] = trainable_depth(prediction.predicted), prediction.describe()
                print(f"search {name}: predicted deepest trainable k = {predictions[name]} at initialisation; "
                      f"starting at k = {min(guesses[name], bound // 3 * 3)}")  # fmt: skip
        nets = {name: net for name, net, _ in jobs}
        trial = DepthTrial(nets, portable(model), epochs=epochs, steps=steps, precision=trainer.precision,
                           runs=study.trial_runs(), **where)  # fmt: skip
        plans = {}
        for name, _, bound in jobs:
            print(f"search {name}: k in 3..{bound}, {seeds} seed(s) per depth, {length}, "
                  f"trainable below {max_error:.0%}")  # fmt: skip
            plans[name] = search_plan(
                bound, seeds, max_error, first_seed, name, guess=guesses.get(name), confirm_seeds=confirm_seeds
            )
        results = run_searches(
            plans,
            trial,
            runner,
            log,
            lambda r: print(f"search {r.variant}: {describe(r, max_error)}", flush=True),
            group=trial.group if grouped else None,
        )
    paths = write_results(results, max_error, study.folder, predictions)
    print(paths["md"].read_text())
    trained = sum((t.variant, t.depth, t.seed) not in known for r in results for t in r.trials)
    seconds = time.perf_counter() - start
    wall = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
    print(f"search: {trained} trial(s) trained in {wall} of wall time")
    print(f"search results: {paths['csv']}, {paths['md']}, {paths['plot']}")
    deepest = [
        {"variant": r.variant, "upper": r.upper, "predicted": predictions.get(r.variant, ""), "deepest": r.deepest,
         "confirmed": confirmation(r), "trials": len(r.trials)}
        for r in results
    ]  # fmt: skip
    study.report(
        tables={"search/trials": [asdict(t) for r in results for t in r.trials], "search/deepest": deepest},
        images={"search/error_vs_depth": paths["plot"]},
    )
    return results
