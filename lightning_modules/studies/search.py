"""The depth search of research line 1: the deepest trainable k = 3m, by binary search over m.

Pure logic, with training injected as `train(depth, seed) -> (train_err, val_err)`, so the search
is testable with a stub and reusable with any net that can be rebuilt at another depth. What is
independent (the seeds of a probed depth, the two confirmation depths, the variants) runs on a
launcher, in parallel where it is Ray's. Trials are recorded one by one in results.csv (atomically),
and a restarted search reuses those already there.
"""

from __future__ import annotations

import copy
import csv
import math
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from torch import nn

from lightning_modules.errors import ConfigError, DivergenceError, require
from lightning_modules.run.config_files import config_name, net_from_config
from lightning_modules.run.files import atomic_savefig, atomic_write, atomic_write_csv
from lightning_modules.studies.launchers import Failed, LocalLauncher, RayLauncher
from lightning_modules.studies.study import Study, StudyFiles
from lightning_modules.studies.trials import TrialRuns, bare_trainer, portable, quiet_lightning, worker_device

FILES = StudyFiles(progress="results.csv", final="results.md")
PLOT = "error_vs_depth.png"
TrainFn = Callable[[int, int], tuple[float, float]]  # (depth, seed) -> (train error, validation error)
Request = tuple[int, int, str]  # a trial a probe needs: (depth, seed, phase)


@dataclass
class Trial:
    """One trained depth and seed. Errors are NaN when the loss diverged or the trial failed."""

    variant: str
    depth: int
    seed: int
    train_err: float  # the trained net's error over the whole training split (evaluation mode)
    val_err: float
    trainable: bool | None  # None until every seed of its depth has trained
    phase: str  # "search" or "confirm"
    error: str = ""  # why the trial failed (it crashed twice): not trainable, and trained again by a restart


@dataclass
class SearchResult:
    """All trials of one variant, the deepest trainable depth found, and whether confirmation agreed."""

    variant: str
    upper: int
    deepest: int  # 0 when not even k=3 trains
    confirmed: bool
    trials: list[Trial] = field(default_factory=list)


def is_trainable(val_errs: list[float], max_error: float) -> bool:
    """A depth is trainable when the mean validation error over its seeds is below `max_error` (NaN: diverged, not)."""
    return all(not math.isnan(e) for e in val_errs) and sum(val_errs) / len(val_errs) < max_error


def search_plan(
    upper: int, seeds: int = 1, max_error: float = 0.2, first_seed: int = 0, variant: str = "net", step: int = 3
) -> Generator[list[Request], list[Trial], SearchResult]:
    """One variant's search as a sequence of probes: yields the (depth, seed, phase) trials a probe needs,
    which can train in parallel, and is sent them back trained, in that order; returns the result.

    Binary search over m in [1, upper // step] for the largest trainable k = step * m. Confirmation then
    trains the two consecutive depths around the boundary (k and k + step) again, in one probe, with
    fresh seeds: the boundary is confirmed when k still trains and k + step still does not.
    """
    if upper < step:
        raise ValueError(f"upper must be at least {step}, got {upper}")
    trials: list[Trial] = []

    def judged(done: list[Trial], depth: int) -> bool:
        at = [t for t in done if t.depth == depth]
        ok = is_trainable([t.val_err for t in at], max_error)
        for trial in at:
            trial.trainable = ok
        return ok

    lo, hi = 0, upper // step + 1  # invariant: lo trainable (0 by convention), hi not (upper+1 by convention)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        done = yield [(step * mid, seed, "search") for seed in range(first_seed, first_seed + seeds)]
        trials += done
        lo, hi = (mid, hi) if judged(done, step * mid) else (lo, mid)
    confirm_seed = first_seed + seeds  # seeds the search did not use
    around = [m for m in (lo, lo + 1) if 1 <= m <= upper // step]
    done = yield [(step * m, seed, "confirm") for m in around for seed in range(confirm_seed, confirm_seed + seeds)]
    trials += done
    confirmed = all(judged(done, step * m) == (m == lo) for m in around)
    return SearchResult(variant, upper, step * lo, confirmed, trials)


def run_searches(
    plans: dict[str, Generator[list[Request], list[Trial], SearchResult]],
    train: Callable[[str, int, int], tuple[float, float]],
    launcher: LocalLauncher | RayLauncher | None = None,
    log: TrialLog | None = None,
    on_done: Callable[[SearchResult], None] | None = None,
) -> list[SearchResult]:
    """Run the variants' searches side by side, `train(variant, depth, seed)` training each trial: every trial a probe needs goes to the launcher as soon as
    the probe is known, and a variant moves on as soon as its own probe has trained. Each trial goes into
    `log` as it finishes; one already there (not failed) is not trained again. With one slot (the local
    launcher) the variants run one after another, in order, as a plain loop would run them."""
    launcher = launcher if launcher is not None else LocalLauncher()
    log = log if log is not None else TrialLog()
    order = {variant: i for i, variant in enumerate(plans)}
    results: dict[str, SearchResult] = {}
    probes: dict[str, tuple[list[Request], list[Trial | None]]] = {}
    queue: list[tuple[str, int]] = []  # (variant, index in its probe) of the trials not yet submitted
    running: dict[int, tuple[str, int]] = {}

    def advance(variant: str, done: list[Trial] | None) -> None:
        while True:  # a probe whose trials are all in the log is answered at once
            try:
                requests = plans[variant].send(done)
            except StopIteration as stop:
                results[variant] = stop.value
                log.save()  # the trials' trainable verdicts
                if on_done is not None:
                    on_done(stop.value)
                return
            log.save()
            found = [log.get(variant, depth, seed) for depth, seed, _ in requests]
            if any(t is None for t in found):
                probes[variant] = requests, found
                queue.extend((variant, i) for i, t in enumerate(found) if t is None)
                return
            done = found

    for variant in plans:
        advance(variant, None)
    while queue or running:
        while queue and len(running) < launcher.slots:
            variant, i = min(queue, key=lambda item: order[item[0]])  # the first variant's trials first
            queue.remove((variant, i))
            depth, seed, _ = probes[variant][0][i]
            running[launcher.submit(f"{variant} k={depth} seed={seed}", train, variant, depth, seed)] = variant, i
        handle, outcome = launcher.wait()
        variant, i = running.pop(handle)
        requests, found = probes[variant]
        depth, seed, phase = requests[i]
        if isinstance(outcome, Failed):
            trial = Trial(variant, depth, seed, math.nan, math.nan, None, phase, outcome.error)
        else:
            trial = Trial(variant, depth, seed, *outcome, None, phase)
        print(f"  {variant} k={depth:4d} seed={seed}: {trial_outcome(trial)}", flush=True)
        found[i] = log.add(trial)
        if all(t is not None for t in found):
            del probes[variant]
            advance(variant, found)
    return [results[variant] for variant in plans]


def search_depth(
    train: TrainFn,
    upper: int,
    seeds: int = 1,
    max_error: float = 0.2,
    first_seed: int = 0,
    variant: str = "net",
    step: int = 3,
    log: TrialLog | None = None,
) -> SearchResult:
    """One variant's search (`search_plan`), its trials trained here one after another by `train`."""
    plan = search_plan(upper, seeds, max_error, first_seed, variant, step)
    return run_searches({variant: plan}, lambda _, depth, seed: train(depth, seed), log=log)[0]


def trial_outcome(trial: Trial) -> str:
    """`train err 0.0312, val err 0.0288`, `diverged` or `failed: <error>`."""
    if trial.error:
        return f"failed: {trial.error}"
    if math.isnan(trial.val_err):
        return "diverged"
    return f"train err {trial.train_err:.4f}, val err {trial.val_err:.4f}"


class TrialLog:
    """The trials of a search so far, by (variant, depth, seed), saved to a CSV file after each one."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.trials: dict[tuple[str, int, int], Trial] = {}
        if path is not None and path.is_file():
            for row in csv.DictReader(path.open(newline="")):
                trainable = {"True": True, "False": False}.get(row["trainable"])
                trial = Trial(
                    row["variant"], int(row["depth"]), int(row["seed"]), float(row["train_err"]),
                    float(row["val_err"]), trainable, row["phase"], row.get("error") or "",
                )  # fmt: skip
                self.trials[(trial.variant, trial.depth, trial.seed)] = trial

    def get(self, variant: str, depth: int, seed: int) -> Trial | None:
        """The trial already trained at (variant, depth, seed); None when it is not, or when it failed."""
        trial = self.trials.get((variant, depth, seed))
        return None if trial is None or trial.error else trial

    def add(self, trial: Trial) -> Trial:
        self.trials[(trial.variant, trial.depth, trial.seed)] = trial
        self.save()
        return trial

    def save(self) -> None:
        if self.path is not None and self.trials:
            write_trials(list(self.trials.values()), self.path)


def write_trials(trials: list[Trial], path: Path) -> None:
    """One CSV row per trial (NaN errors: diverged), written atomically."""
    atomic_write_csv(path, list(asdict(trials[0])), (asdict(t) for t in trials))


def describe(result: SearchResult, max_error: float) -> str:
    """The search's outcome in a line: the deepest trainable depth and whether it was confirmed, or that none trained."""
    if result.deepest == 0:
        searched = [t for t in result.trials if t.phase == "search"]
        first = sorted((t for t in searched if t.depth == min(t.depth for t in searched)), key=lambda t: t.seed)
        errs = [t.val_err for t in first]
        if any(t.error for t in first):
            how = "failed"
        elif any(math.isnan(e) for e in errs):
            how = "diverged"
        else:
            how = f"has val err {sum(errs) / len(errs):.2f}"
        line = f"no depth trainable: k = {first[0].depth} {how} (trainable: below {max_error:.2f})"
        if not result.confirmed:
            line += f"; NOT confirmed: k = {first[0].depth} trains with other seeds, try more --seeds"
    else:
        verdict = "confirmed" if result.confirmed else "NOT confirmed: the boundary is noisy, try more --seeds"
        line = f"deepest trainable k = {result.deepest} ({verdict})"
    failed = sum(bool(t.error) for t in result.trials)
    if failed:  # a failed trial counts as untrainable: the boundary may be too low
        line += f"; {failed} trial(s) FAILED and counted as untrainable (see results.md; the same command retries them)"
    return line


def write_results(results: list[SearchResult], max_error: float, folder: Path) -> dict[str, Path]:
    """Write results.csv, results.md (per-trial table and per-variant summary) and error_vs_depth.png."""
    folder.mkdir(parents=True, exist_ok=True)
    trials = [t for r in results for t in r.trials]
    paths = {"csv": folder / FILES.progress, "md": folder / FILES.final, "plot": folder / PLOT}
    write_trials(trials, paths["csv"])
    lines = [
        f"Trainable: mean validation error over seeds below {max_error:.0%}.",
        "",
        "| variant | search upper bound | max trainable k | confirmed |",
        "| --- | ---: | ---: | --- |",
    ]
    lines += [
        f"| {r.variant} | {r.upper} | {r.deepest or 'none'} | {'yes' if r.confirmed else 'no'} |" for r in results
    ]
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


def plot_errors(results: list[SearchResult], max_error: float, path: Path):
    """Validation error against depth, one series per variant; diverged runs drawn at error 1. The depth axis has
    a tick at each probed depth (at most 10; else whole numbers). Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        points = sorted((t.depth, 1.0 if math.isnan(t.val_err) else t.val_err) for t in r.trials)
        ax.plot([d for d, _ in points], [e for _, e in points], "o", alpha=0.7, label=f"{r.variant} (k*={r.deepest})")
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


def error_rate(trainer: pl.Trainer, model: pl.LightningModule, loader) -> float:
    """The fraction of a loader's samples that a trained model gets wrong, in evaluation mode, at the trainer's
    precision and on its device."""
    wrong = torch.zeros((), dtype=torch.long, device=model.device)
    total = 0
    model.eval()
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        for x, y in loader:
            x, y = x.to(model.device), y.to(model.device)
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
) -> list[SearchResult]:
    """The `search` subcommand (its arguments are documented on the Trainer's method): every variant's search, its
    trials on the launcher, recorded as they finish; then results.csv, results.md, the plot and the W&B tables."""
    study.require_one_process("each trial trains on one device; --launcher ray trains trials in parallel")
    study.refuse_unhonoured(honoured=("precision", "max_steps"))
    if not callable(getattr(datamodule, "eval_dataloader", None)):  # each trial's error on its training split
        raise ConfigError(f"search needs one of the in-memory datamodules; {type(datamodule).__name__} is not")
    require("positive", seeds=seeds, epochs=epochs, cpus_per_trial=cpus_per_trial)
    require("probability", max_error=max_error)
    require("non_negative", trials_per_gpu=trials_per_gpu)
    for name, bound in [("upper", upper), *(variants or {}).items()]:
        if bound is not None and bound < 3:
            raise ConfigError(
                f"{name}: the search's upper bound must be at least 3 (the shallowest depth), got {bound}"
            )
    if variants:
        jobs = [(config_name(path), net_from_config(path), bound) for path, bound in variants.items()]
    elif upper is not None:
        jobs = [(study.run_name, model.net, upper)]
    else:
        raise ConfigError("search needs --upper (the largest depth to try) or --variants")
    for _, net, _ in jobs:
        if not hasattr(net, "at_depth"):
            raise ConfigError(f"{type(net).__name__} has no at_depth(k): the search must rebuild it at other depths")
    first_seed = pl.seed_everything(verbose=False)  # the run's seed (seed_everything in the config)
    trainer = study.trainer
    steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
    length = f"{steps} steps" if steps else f"{epochs} epochs"
    log = TrialLog(study.folder / FILES.progress)  # a killed search's trials
    if log.trials:
        print(f"search: {len(log.trials)} trial(s) already in {log.path}, not trained again")
    with study.trials(datamodule, launcher, ray_address, cpus_per_trial, trials_per_gpu) as (runner, where):
        nets = {name: net for name, net, _ in jobs}
        trial = DepthTrial(nets, portable(model), epochs=epochs, steps=steps, precision=trainer.precision,
                           runs=study.trial_runs(), **where)  # fmt: skip
        plans = {}
        for name, _, bound in jobs:
            print(f"search {name}: k in 3..{bound}, {seeds} seed(s) per depth, {length}, "
                  f"trainable below {max_error:.0%}")  # fmt: skip
            plans[name] = search_plan(bound, seeds, max_error, first_seed, name)
        results = run_searches(
            plans, trial, runner, log, lambda r: print(f"search {r.variant}: {describe(r, max_error)}", flush=True)
        )
    paths = write_results(results, max_error, study.folder)
    print(paths["md"].read_text())
    print(f"search results: {paths['csv']}, {paths['md']}, {paths['plot']}")
    deepest = [
        {"variant": r.variant, "upper": r.upper, "deepest": r.deepest, "confirmed": r.confirmed} for r in results
    ]
    study.report(
        tables={"search/trials": [asdict(t) for r in results for t in r.trials], "search/deepest": deepest},
        images={"search/error_vs_depth": paths["plot"]},
    )
    return results
