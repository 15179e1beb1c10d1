"""The `plasticity` subcommand (spec 07): every intervention x seed trained on the config's task stream, per task its
online and final accuracy, dead and dormant shares, srank, weight norm, and the weights' stable rank and spectral
alpha (WeightSpectra, means over layers); results.csv (trial by trial, so the same command continues a killed study),
results.md (per task: mean and spread over seeds; the summary of the first and last 3 tasks), plasticity.png and
mechanism.png, and the W&B tables.
"""

from __future__ import annotations

import copy
import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger, WandbLogger

from callbacks import ActivationStats, DeadUnits, TaskAccuracy, WeightSpectra
from lightning_modules.errors import ConfigError
from lightning_modules.plasticity import Interventions, Plasticity, reinitialise
from lightning_modules.run.files import atomic_savefig, atomic_write, atomic_write_csv
from lightning_modules.studies.stream_stack import (
    BLOCKING_EPS,
    FEATURE_ROWS,
    LOGGED,
    SPECTRA_TAIL,
    StackedStreamTrial,
    stack_refusal,
)
from lightning_modules.studies.study import Study, StudyFiles
from lightning_modules.studies.trials import TrialRuns, bare_trainer, portable, quiet_lightning, worker_device

FILES = StudyFiles(progress="results.csv", final="results.md")
COLUMNS = ("intervention", "seed", "task", "acc_online", "acc_final", "dead", "dormant", "srank", "weight_norm",
           "stable_rank", "alpha")  # fmt: skip
NUMERIC = COLUMNS[3:]
MEASURES = {column: key for column, key in LOGGED.items() if column != "srank"}  # srank: the mean over layers


class RecordingLogger(Logger):
    """Keeps what a trial's callbacks log, by step, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "trial"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float | torch.Tensor)}
        self.steps.setdefault(step or 0, {}).update(numbers)


@dataclass
class StreamTrial:
    """One intervention and seed over the whole stream: `trial(name, settings, seed)` trains a fresh copy of the
    model, its net drawn from `seed` (each module's init, as `fit --seed_everything seed` draws an MLP) with
    `Plasticity(**settings, seed=seed)` (fresh weights drawn from the trial's seed), and returns one row per task;
    with `runs`, the trial is also a W&B run of its own in the study's group, with everything its callbacks log
    (task/index beside each task's measures)."""

    template: pl.LightningModule
    datamodule: pl.LightningDataModule
    device: str | None = None
    runs: TrialRuns | None = None

    def __call__(self, name: str, settings: dict, seed: int) -> list[dict]:
        pl.seed_everything(seed, verbose=False)
        model = copy.deepcopy(self.template)
        reinitialise(model.net, seed)
        model.interventions = Interventions(Plasticity(**settings, seed=seed), model.net) if settings else None
        model.initial_weights = model.interventions.initial_weights(model.net) if model.interventions else None
        stream, device = self.datamodule, worker_device(self.device)
        steps = stream.tasks.count * stream.steps_per_task
        recorder = RecordingLogger()
        run = (
            self.runs.start(f"{name} seed={seed}", {"intervention": name, "seed": seed, **settings})
            if self.runs
            else None
        )
        finished = False
        try:
            with quiet_lightning():
                trainer = bare_trainer(
                    -1, max_steps=steps, val_check_interval=stream.steps_per_task, check_val_every_n_epoch=None,
                    callbacks=[TaskAccuracy(), DeadUnits(blocking_eps=BLOCKING_EPS, print_table=False),
                               ActivationStats(pca=False, pca_samples=FEATURE_ROWS, print_table=False),
                               WeightSpectra(on="validation", min_tail=SPECTRA_TAIL)],
                    logger=[recorder, WandbLogger(experiment=run)] if run is not None else recorder,
                    accelerator="gpu" if device.type == "cuda" else "cpu",
                    devices=[device.index or 0] if device.type == "cuda" else 1,
                )  # fmt: skip
                trainer.fit(model, datamodule=stream)
            finished = True
        finally:
            if run is not None:  # a crashed trial's run is marked failed
                run.finish(exit_code=0 if finished else 1)
        rows = []
        for logged in recorder.steps.values():
            if "task/index" in logged:
                ranks = [v for k, v in logged.items() if k.startswith("act/") and k.endswith("/srank")]
                row = {"intervention": name, "seed": seed, "task": int(logged["task/index"])}
                row.update({column: logged.get(key, math.nan) for column, key in MEASURES.items()})
                rows.append({**row, "srank": statistics.mean(ranks) if ranks else math.nan})
        return rows


def read_rows(path: Path) -> list[dict]:
    """The rows of the trials a killed study finished."""
    if not path.is_file():
        return []
    rows = list(csv.DictReader(path.open(newline="")))
    return [{**r, "seed": int(r["seed"]), "task": int(r["task"]), **{k: float(r.get(k) or "nan") for k in NUMERIC}}
            for r in rows]  # fmt: skip


def finite(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def spread(values: list[float]) -> str:
    """`0.912 (0.004)`: the mean and standard deviation over seeds of the finite values."""
    kept = finite(values)
    if not kept:
        return ""
    return f"{statistics.mean(kept):.3f}" + (f" ({statistics.stdev(kept):.3f})" if len(kept) > 1 else "")


def mean_sd(values: list[float]) -> tuple[float, float]:
    kept = finite(values)
    if not kept:
        return math.nan, math.nan
    return statistics.mean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0


def write_results(rows: list[dict], names: list[str], folder: Path) -> dict[str, Path]:
    """results.md (per intervention and task: mean (sd) over seeds; the first and last 3 tasks), the plots."""
    paths = {"csv": folder / FILES.progress, "md": folder / FILES.final}
    tasks = sorted({r["task"] for r in rows})
    lines = ["Per intervention and task, mean (standard deviation) over seeds.", ""]
    lines += ["| intervention | task | acc online | acc final | dead | dormant (tau 0.025) | srank | weight norm "
              "| stable rank | alpha |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name in names:
        for task in tasks:
            own = [r for r in rows if r["intervention"] == name and r["task"] == task]
            cells = [spread([r[c] for r in own]) for c in NUMERIC]
            lines.append(f"| {name} | {task} | " + " | ".join(cells) + " |")
    first, last = tasks[:3], tasks[-3:]
    lines += ["", f"Online accuracy on the first 3 tasks ({first[0]}-{first[-1]}) and the last 3 "
              f"({last[0]}-{last[-1]}), mean over tasks and seeds:", "",
              "| intervention | first 3 | last 3 | change |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
    for name in names:
        early = [r["acc_online"] for r in rows if r["intervention"] == name and r["task"] in first]
        late = [r["acc_online"] for r in rows if r["intervention"] == name and r["task"] in last]
        change = statistics.mean(late) - statistics.mean(early)
        lines.append(f"| {name} | {statistics.mean(early):.3f} | {statistics.mean(late):.3f} | {change:+.3f} |")
    atomic_write(paths["md"], "\n".join(lines) + "\n")
    paths["plasticity"] = plot(rows, names, tasks, ["acc_online", "acc_final"], folder / "plasticity.png")
    paths["mechanism"] = plot(rows, names, tasks, ["dormant", "srank", "weight_norm", "stable_rank"],
                              folder / "mechanism.png")  # fmt: skip
    return paths


def plot(rows: list[dict], names: list[str], tasks: list[int], columns: list[str], path: Path) -> Path:
    """One panel per column: the measure against the task, one line per intervention, a band of +-1 sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(5 * len(columns), 3.5))
    for ax, column in zip(axes, columns, strict=True):
        for i, name in enumerate(names):
            values = [[r[column] for r in rows if r["intervention"] == name and r["task"] == t] for t in tasks]
            mean, sd = zip(*(mean_sd(v) for v in values), strict=True)
            ax.plot(tasks, mean, color=f"C{i}", label=name)
            low, high = ([m + sign * s for m, s in zip(mean, sd, strict=True)] for sign in (-1, 1))
            ax.fill_between(tasks, low, high, color=f"C{i}", alpha=0.2)
        ax.set(xlabel="task", ylabel=column.replace("_", " "))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def trial_jobs(
    model: pl.LightningModule,
    stream: pl.LightningDataModule,
    interventions: dict[str, dict],
    seeds: range,
    done: set[tuple[str, int]],
    stack_seeds: bool,
) -> list[tuple[str, list[int] | int]]:
    """What to train: per intervention, its seeds not yet done as one stack (a list of seeds) where it can stack, else
    each seed on its own."""
    jobs = []
    for name, settings in interventions.items():
        left = [seed for seed in seeds if (name, seed) not in done]
        refusal = stack_refusal(model, settings or {}, stream) if stack_seeds else "not asked to"
        if refusal is None and left:
            jobs.append((name, left))
        else:
            if stack_seeds and len(left) > 1:
                print(f"plasticity: {name} trains its seeds one by one: {refusal}")
            jobs += [(name, seed) for seed in left]
    return jobs


def run_plasticity(
    study: Study,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    interventions: dict[str, dict] | None,
    seeds: int,
    stack_seeds: bool,
    launcher: str,
    ray_address: str | None,
    cpus_per_trial: float,
    trials_per_gpu: int,
) -> list[dict]:
    """The `plasticity` subcommand (its arguments are documented on the Trainer's method)."""
    study.require_one_process("each trial trains on one device; --launcher ray trains trials in parallel")
    study.refuse_unhonoured(honoured=("max_steps",))
    if not hasattr(datamodule, "steps_per_task"):
        raise ConfigError("plasticity needs a task stream: data: datamodules.TaskStream (docs/plasticity.md)")
    interventions = interventions or {"none": {}}
    for name, settings in interventions.items():
        if "seed" in (settings or {}):
            raise ConfigError(
                f"interventions.{name}.seed: each trial draws its fresh weights from its own seed; drop it"
            )
        try:
            Interventions(Plasticity(**(settings or {})), copy.deepcopy(model.net))
        except TypeError as e:
            raise ConfigError(f"interventions.{name}: {e}") from e
    first_seed = pl.seed_everything(verbose=False)
    progress = study.folder / FILES.progress
    rows = read_rows(progress)
    done = {(r["intervention"], r["seed"]) for r in rows}
    queue = trial_jobs(model, datamodule, interventions, range(first_seed, first_seed + seeds), done, stack_seeds)
    if done:
        print(f"plasticity: {len(done)} trial(s) already in {progress}, not trained again")
    with study.trials(datamodule, launcher, ray_address, cpus_per_trial, trials_per_gpu) as (runner, where):
        template, runs = portable(model), study.trial_runs()
        one, stacked = StreamTrial(template, runs=runs, **where), StackedStreamTrial(template, runs=runs, **where)
        handles = {}
        while queue or handles:
            while queue and len(handles) < runner.slots:
                name, trained = queue.pop(0)
                label = f"{name} seeds={trained}" if isinstance(trained, list) else f"{name} seed={trained}"
                trial = stacked if isinstance(trained, list) else one
                handles[runner.submit(label, trial, name, interventions[name] or {}, trained)] = label
            handle, outcome = runner.wait()
            label = handles.pop(handle)
            if not isinstance(outcome, list):
                raise ConfigError(f"plasticity {label} failed twice: {outcome.error}")
            rows += outcome
            atomic_write_csv(progress, list(COLUMNS), rows)
            for seed in dict.fromkeys(r["seed"] for r in outcome):
                accs = ", ".join(f"{r['acc_online']:.3f}" for r in outcome if r["seed"] == seed)
                print(f"  {outcome[0]['intervention']} seed={seed}: online accuracy per task {accs}", flush=True)
    names = list(interventions)
    paths = write_results(rows, names, study.folder)
    print(paths["md"].read_text())
    print(f"plasticity results: {progress}, {paths['md']}, {paths['plasticity']}, {paths['mechanism']}")
    study.report(tables={"plasticity/tasks": rows}, images={"plasticity/curves": paths["plasticity"],
                                                            "plasticity/mechanism": paths["mechanism"]})  # fmt: skip
    return rows
