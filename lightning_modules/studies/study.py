"""What every study does around its trainings: its run folder and files, the settings it refuses, where its trials
train (a launcher, and the data placed for it), their W&B runs, and its tables and plots on W&B.

A study is many trainings (or measurements, for `propagate`) inside one `train.py` run (`search`, `sweep`,
`noise`, `propagate`); its body lives in its own module and takes a `Study`. The Trainer's subcommand methods
only hand their arguments over.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy
import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from lightning_modules.errors import ConfigError
from lightning_modules.run.loggers import start_wandb
from lightning_modules.studies.launchers import make_launcher
from lightning_modules.studies.trials import TrialRuns, portable


@dataclass(frozen=True)
class StudyFiles:
    """A study's result files: `progress` is written as it goes (the same command continues a killed study from
    it), `final` at the end (a study that has it is finished and starts a new folder)."""

    progress: str
    final: str


class Study:
    """One study's run: `trainer` is the run's Trainer (its folder, loggers, device and settings)."""

    def __init__(self, name: str, trainer: pl.Trainer):
        if getattr(trainer, "fast_dev_run", False):  # it would log nothing and write its files loose into runs/
            raise ConfigError(f"{name} does not apply --trainer.fast_dev_run to its work: unset it")
        self.name, self.trainer = name, trainer
        self.folder = Path(trainer.log_dir or trainer.default_root_dir)  # a study runs in one process: no broadcast

    @property
    def run_name(self) -> str:
        """The run's name (the CLI's; a Trainer built in a notebook has none: `study`)."""
        run = getattr(self.trainer, "run", None)
        return run.name if run is not None else self.name

    def require_one_process(self, why: str) -> None:
        """Refuse several processes, which the study would ignore (or run once per rank)."""
        if self.trainer.world_size > 1:
            raise ConfigError(f"{self.name} runs in one process ({why}): set --trainer.devices 1 --trainer.num_nodes 1")

    def refuse_unhonoured(self, honoured: tuple[str, ...] = ()) -> None:
        """Refuse the trainer settings that change training but that the study's own trainings would not apply."""
        trainer = self.trainer
        changed = {
            "precision": str(trainer.precision) not in ("32-true", "32"),
            "max_steps": trainer.max_steps not in (None, -1),
            "accumulate_grad_batches": trainer.accumulate_grad_batches != 1,
            "gradient_clip_val": bool(trainer.gradient_clip_val),
            "limit_train_batches": trainer.limit_train_batches not in (None, 1.0),
        }
        ignored = [f"--trainer.{name}" for name, set_ in changed.items() if set_ and name not in honoured]
        if ignored:
            raise ConfigError(f"{self.name} does not apply {', '.join(ignored)} to its trainings: unset it")

    def set_up(self, datamodule: pl.LightningDataModule, stage: str) -> None:
        """The datamodule's splits read and placed on the run's device, as the run's Trainer would set them up."""
        datamodule.trainer = self.trainer
        datamodule.setup(stage)

    @contextmanager
    def trials(
        self, datamodule: pl.LightningDataModule, launcher: str, address: str | None, cpus: float, per_gpu: int
    ) -> Iterator[tuple[object, dict]]:
        """The launcher the trials run on, and where they train: this process's device and datamodule (`local`),
        or a Ray worker's device and the data read here once and sent on the CPU (`ray`). Closed at the end."""
        self.set_up(datamodule, "fit")
        runner = make_launcher(launcher, address, cpus, per_gpu)
        try:
            if launcher == "local":
                yield runner, {"datamodule": datamodule, "device": str(self.trainer.strategy.root_device)}
            else:
                yield runner, {"datamodule": portable(datamodule), "device": None if runner.gpu else "cpu"}
        finally:
            runner.close()

    def start_wandb(self) -> None:
        """Start the study's own W&B run: once the study runs its first trial or has its tables, so that a study
        that refuses (its settings, data, checkpoints) has started none."""
        start_wandb(self.trainer.loggers, self.folder)

    def trial_runs(self) -> TrialRuns | None:
        """Each trial's own W&B run, in the study's group (None when the run logs to no W&B)."""
        self.start_wandb()
        return TrialRuns.of(self.trainer)

    def report(self, tables: dict[str, list[dict]], images: dict[str, Path]) -> None:
        """Log the study's tables (rows as dicts; the columns are every key, in order) and plots to W&B."""
        self.start_wandb()
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                for key, rows in tables.items():
                    logger.log_table(key, *typed_table(rows))
                for key, path in images.items():
                    logger.log_image(key, [str(path)])


def typed_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """The columns (every key, in order) and cells of a W&B table, each column of one type: W&B types a column by
    its first row and refuses a later cell of another type. An empty cell ("" or None) is None, which any column
    takes; a column that mixes kinds (numbers, booleans, text) is text throughout."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[None if row.get(c) is None or isinstance(row[c], str) and not row[c] else row[c] for c in columns]
             for row in rows]  # fmt: skip
    for i in range(len(columns)):
        kinds = {cell_kind(row[i]) for row in cells if row[i] is not None}
        if len(kinds) > 1:
            for row in cells:
                row[i] = None if row[i] is None else str(row[i])
    return columns, cells


def cell_kind(value: object) -> str:
    """How W&B types a cell: ints and floats are both numbers, a bool is not one."""
    if isinstance(value, bool | numpy.bool_):
        return "bool"
    return "number" if isinstance(value, numbers.Real) else type(value).__name__
