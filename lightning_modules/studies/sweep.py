"""Sweeps of widths, sizes, penalties and seeds for the one-hidden-layer net (research line 3).

A sweep is a list of grids; each grid maps argument names to lists of values and stands for their
cartesian product. Every point trains all its seeds at once as one `SeedStack` (together with the
points whose nets have the same shapes: other starting sizes or penalties), then measures
what DeadUnits and ActivationStats measure on the hidden layer over the validation split. Results:
one row per (point, seed) in runs.csv/.md, and one row per epoch in history.csv.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from datamodules.tensor_data import TensorDataModule
from lightning_modules.errors import ConfigError, require
from lightning_modules.run.files import atomic_save, atomic_write, atomic_write_csv
from lightning_modules.statistics.unit_statistics import pca_summary, variance_summary
from lightning_modules.studies.launchers import Failed
from lightning_modules.studies.seed_stack import EpochRecord, SeedStack
from lightning_modules.studies.study import Study, StudyFiles
from lightning_modules.studies.sweep_plots import write_plots
from lightning_modules.studies.trials import TrialRuns, portable, worker_device

FILES = StudyFiles(progress="sweep_progress.pt", final="runs.md")  # the stacks trained so far; the summary
TABLES = {"csv": "runs.csv", "history": "history.csv"}
# grid keys that are not net arguments
TRAINING_KEYS = ("penalty",)
# net arguments that only set initial values, not shapes: points differing in them share a stack
INIT_ONLY_KEYS = ("start_size",)


def expand_grids(grids: list[dict[str, list]]) -> list[dict]:
    """The points of every grid (the cartesian product of its value lists), grid after grid."""
    points = []
    for grid in grids:
        if not grid:
            raise ValueError("an empty grid: give each grid at least one argument with a list of values")
        keys = list(grid)
        values = [v if isinstance(v, list | tuple) else [v] for v in grid.values()]
        points += [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]
    return points


def point_label(point: dict) -> str:
    """A short readable name for a grid point: `layer=flexible width=1024 start_size=32`."""
    return " ".join(f"{k}={v}" for k, v in point.items())


def stack_groups(points: list[dict]) -> list[list[dict]]:
    """Points that build nets of the same shape (they differ only in `start_size` or `penalty`) train
    as one stack; the groups keep the points' order."""
    groups: dict[tuple, list[dict]] = {}
    for point in points:
        key = tuple(sorted((k, repr(v)) for k, v in point.items() if k not in (*TRAINING_KEYS, *INIT_ONLY_KEYS)))
        groups.setdefault(key, []).append(point)
    return list(groups.values())


def run_group(
    template: nn.Module,
    points: list[dict],
    seeds: list[int],
    data: TensorDataModule,
    epochs: int,
    optimizer,
    scheduler=None,
    penalty: float = 0.0,
    device: torch.device | str = "cpu",
    pca_samples: int = 2048,
    pca_k: tuple[int, ...] = (1, 10, 50),
    zero_tol: float = 0.0,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> tuple[list[dict], list[dict], list[torch.Tensor]]:
    """Train every seed of these same-shaped grid points as one stack; returns one result row per
    (point, seed), the history rows, and each run's hidden-unit variances (for the variance plot)."""
    makers = [_maker(template, {k: v for k, v in p.items() if k not in TRAINING_KEYS}) for p in points]
    stack = SeedStack.build(makers, seeds).to(device)
    members = [(point, seed) for point in points for seed in seeds]  # the stack's order
    # a static net has no penalty: its rows say 0, whatever the config's lambda
    penalties = [0.0 if stack.template.layer == "static" else point.get("penalty", penalty) for point, _ in members]
    records = stack.fit(data, epochs, optimizer, scheduler, penalties, on_epoch)
    stats = stack.hidden_statistics(data.eval_dataloader("val"), pca_samples)
    last = records[-1]
    rows, history, variances = [], [], []
    for i, (point, seed) in enumerate(members):
        described = {**stack.template.args, **point, "penalty": penalties[i]}
        labels = {k: described[k] for k in ("layer", "width", "start_size", "penalty")}
        var = stats.moments[i].var.float().cpu()
        variances.append(var)
        diverged = not math.isfinite(last.train_loss[i])
        row = {
            **labels,
            "seed": seed,
            "epochs": epochs,
            "diverged": diverged,
            "size": _size(last, i),
            "train_acc": last.train_acc[i],
            "val_acc": last.val_acc[i],
            "val_loss": last.val_loss[i],
            "dead": int((stats.peaks[i] <= 0).sum()),
        }
        if not diverged:
            row.update(variance_summary(var.numpy(), zero_tol))
            row.update(pca_summary(stats.pre_rows[i], pca_k)[1])
        rows.append(row)
        history += [
            {
                **labels,
                "seed": seed,
                "epoch": r.epoch,
                "size": _size(r, i),
                "train_loss": r.train_loss[i],
                "penalty_loss": r.penalty[i],
                "train_acc": r.train_acc[i],
                "val_acc": r.val_acc[i],
                "grad_norm": r.grad_norm[i],  # the training-dynamics signals, per member (TrainingDynamics'
                "weight_norm": r.weight_norm[i],  # grad_norm/total and the weights' norm, once an epoch)
            }
            for r in records
        ]
    return rows, history, variances


def failed_rows(
    template: nn.Module, points: list[dict], seeds: list[int], epochs: int, penalty: float, error: str
) -> list[dict]:
    """The result rows of a stack that failed twice: each (point, seed) with its labels and the error."""
    rows = []
    for point in points:
        described = {**template.args, **point}
        described["penalty"] = 0.0 if described.get("layer") == "static" else point.get("penalty", penalty)
        labels = {k: described.get(k) for k in ("layer", "width", "start_size", "penalty")}
        rows += [{**labels, "seed": seed, "epochs": epochs, "diverged": False, "error": error} for seed in seeds]
    return rows


def _maker(template: nn.Module, args: dict) -> Callable[[], nn.Module]:
    return lambda: template.variant(**args)


def _size(record: EpochRecord, index: int) -> float:
    return record.sizes["hidden"][index] if "hidden" in record.sizes else math.nan


def write_tables(rows: list[dict], history: list[dict], folder: Path) -> dict[str, Path]:
    """runs.csv, runs.md (the main columns, mean over seeds per point) and history.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / TABLES["csv"], "md": folder / FILES.final, "history": folder / TABLES["history"]}
    for path, table in ((paths["csv"], rows), (paths["history"], history)):
        atomic_write_csv(path, list(dict.fromkeys(k for row in table for k in row)), table)
    atomic_write(paths["md"], markdown_summary(rows))
    return paths


def markdown_summary(rows: list[dict]) -> str:
    """One line per grid point: seeds, final size, accuracy and the hidden-layer statistics, mean (std) over seeds."""
    columns = ["size", "val_acc", "dead", "var_sum", "shapiro_w", "pca_k90"]
    lines = [
        "| layer | width | start size | penalty | seeds | " + " | ".join(columns) + " | note |",
        "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in columns) + " | --- |",
    ]
    points: dict[tuple, list[dict]] = {}
    for row in rows:
        points.setdefault((row["layer"], row["width"], row["start_size"], row["penalty"]), []).append(row)
    for (layer, width, start, penalty), group in points.items():
        cells = []
        for column in columns:
            values = torch.tensor([float(r.get(column, math.nan)) for r in group], dtype=torch.float64)
            values = values[~values.isnan()]
            if len(values) == 0:
                cells.append("-")
            elif len(values) == 1:
                cells.append(_fmt(values[0].item()))
            else:
                mean = values.mean().item()
                cells.append(f"{_fmt(mean)} ({_fmt(values.std().item(), like=mean)})")
        start_cell = "-" if start is None else f"{start:g}"
        errors = [r["error"] for r in group if r.get("error")]
        note = f"{len(errors)} FAILED: {errors[0]}".replace("|", "/") if errors else ""
        lines.append(
            f"| {layer} | {width} | {start_cell} | {penalty:g} | {len(group)} | " + " | ".join(cells) + f" | {note} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: float, like: float | None = None) -> str:
    """4 decimals below 10, else 1; `like`: as many decimals as that value gets (a spread, as many as its mean)."""
    return f"{value:.4f}" if abs(value if like is None else like) < 10 else f"{value:.1f}"


@dataclass
class StackTrial:
    """One stack of a sweep: `trial(points, seeds)` trains those same-shaped grid points for every seed as one
    SeedStack on a set-up in-memory datamodule and returns `run_group`'s (rows, history, variances)."""

    model: pl.LightningModule  # a Classifier-like module: its net is the template, its optimizer the recipe
    datamodule: pl.LightningDataModule
    epochs: int
    pca_samples: int = 2048
    pca_k: tuple[int, ...] = (1, 10, 50)
    zero_tol: float = 0.0
    device: str | None = None

    def __call__(self, points: list[dict], seeds: list[int]) -> tuple[list[dict], list[dict], list[torch.Tensor]]:
        device = worker_device(self.device)
        data = self.datamodule
        if next(iter(data.splits.values())).images.device != device:
            data = portable(data, device)
        rows, history, variances = run_group(
            self.model.net,
            points,
            seeds,
            data,
            self.epochs,
            self.model.build_optimizer,
            self.model.scheduler_factory,
            getattr(self.model, "penalty", 0.0),
            device,
            self.pca_samples,
            self.pca_k,
            self.zero_tol,
        )
        return rows, history, [v.cpu() for v in variances]


def run_sweep(
    study: Study,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    grids: list[dict[str, list]] | None,
    seeds: int,
    epochs: int,
    pca_samples: int,
    pca_k: list[int] | None,
    zero_tol: float,
    launcher: str,
    ray_address: str | None,
    cpus_per_trial: float,
    trials_per_gpu: int,
) -> list[dict]:
    """The `sweep` subcommand (its arguments are documented on the Trainer's method): every grid point's seeds as
    one stack, the stacks on the launcher, each saved as it finishes; then the tables, plots and W&B runs."""
    study.require_one_process("it stacks seeds, not ranks")
    study.refuse_unhonoured()
    require("positive", seeds=seeds, epochs=epochs, pca_samples=pca_samples, cpus_per_trial=cpus_per_trial)
    require("non_negative", zero_tol=zero_tol, trials_per_gpu=trials_per_gpu)
    require("positive", **{f"pca_k[{i}]": k for i, k in enumerate(pca_k or ())})
    if getattr(datamodule, "first_epoch_batch_size", None):
        raise ConfigError("sweep trains every epoch at data.batch_size: unset data.first_epoch_batch_size")
    if not callable(getattr(model.net, "variant", None)) or not callable(getattr(model, "build_optimizer", None)):
        raise ConfigError(
            f"sweep needs a Classifier-like model over a net with variant(**args) "
            f"(lightning_modules.nets.MLP); got {type(model).__name__} over {type(model.net).__name__}"
        )
    points = expand_grids(grids) if grids else [{}]
    for point in points:  # every point must build, before any training starts (shapes only: no memory)
        try:
            with torch.device("meta"):
                model.net.variant(**{k: v for k, v in point.items() if k not in TRAINING_KEYS})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"sweep grid point {point_label(point)}: {e}") from e
    first_seed = pl.seed_everything(verbose=False)
    seed_list = list(range(first_seed, first_seed + seeds))
    groups = stack_groups(points)
    progress = study.folder / FILES.progress
    done = torch.load(progress, weights_only=True) if progress.is_file() else {}  # a killed sweep's stacks
    for n in sorted(n for n in done if n <= len(groups)):
        print(f"sweep [{n}/{len(groups)}] already in {progress}, not trained again", flush=True)
    results = {n: done[n] for n in done if n <= len(groups)}
    with study.trials(datamodule, launcher, ray_address, cpus_per_trial, trials_per_gpu) as (runner, where):
        stack = StackTrial(portable(model), epochs=epochs, pca_samples=pca_samples,
                           pca_k=tuple(pca_k or (1, 10, 50)), zero_tol=zero_tol, **where)  # fmt: skip
        handles = {}
        for n, group in enumerate(groups, 1):
            if n not in results:
                label = f"sweep [{n}/{len(groups)}] {len(group)} point(s) x {seeds} seed(s) as one stack"
                print(f"{label}, {epochs} epochs", flush=True)
                handles[runner.submit(label, stack, group, seed_list)] = n
        runs = study.trial_runs()
        while handles:
            handle, outcome = runner.wait()
            n = handles.pop(handle)
            group = groups[n - 1]
            if isinstance(outcome, Failed):  # reported in the tables, trained again by a restart
                failed = failed_rows(model.net, group, seed_list, epochs, getattr(model, "penalty", 0.0), outcome.error)
                results[n] = failed, [], [torch.empty(0)] * len(failed)
                continue
            results[n] = done[n] = outcome
            atomic_save(done, progress)  # each stack as it finishes: a restarted sweep skips it
            say_stack(n, len(groups), group, outcome, seeds, epochs, runs)
    rows, history, variances = [], [], []
    for n in sorted(results):
        rows, history, variances = rows + results[n][0], history + results[n][1], variances + results[n][2]
    paths = write_tables(rows, history, study.folder)
    plots = write_plots(rows, history, variances, study.folder)
    print(paths["md"].read_text())
    print("sweep results: " + ", ".join(str(p) for p in [*paths.values(), *plots]))
    study.report(
        tables={"sweep/runs": rows, "sweep/history": history}, images={f"sweep/{plot.stem}": plot for plot in plots}
    )
    return rows


def say_stack(n: int, total: int, group: list[dict], outcome, seeds: int, epochs: int, runs: TrialRuns | None) -> None:
    """Print a finished stack's accuracies and sizes; log each of its runs to W&B as a run of its own."""
    rows, history, _ = outcome
    for i, point in enumerate(group):
        members = rows[i * seeds : (i + 1) * seeds]
        accs = ", ".join(f"{r['val_acc']:.4f}" for r in members)
        sizes = ", ".join(f"{r['size']:g}" for r in members)
        print(f"  [{n}/{total}] {point_label(point) or 'the config net'}: val acc {accs}; size {sizes}", flush=True)
    if runs is None:
        return
    for i, row in enumerate(rows):
        point = group[i // seeds]
        config = {**point, "seed": row["seed"], "epochs": epochs}
        name = f"{point_label(point) or 'the config net'} seed={row['seed']}"
        runs.log_finished(name, config, history[i * epochs : (i + 1) * epochs], row)
