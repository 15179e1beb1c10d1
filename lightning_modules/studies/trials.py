"""The trials of the studies as picklable callables, so that a launcher can run them here or in a Ray worker.

A trial carries what it trains on (the model template, the data on the CPU, no trainer) and seeds
itself, so that the same trial gives the same result in this process and in a worker.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from datamodules.tensor_data import moved_splits
from lightning_modules.run.loggers import RunWandbLogger


def bare_trainer(max_epochs: int, **kwargs) -> pl.Trainer:
    """A Trainer for a short fit inside another job (a search trial, a reference run): no logger,
    checkpoints, progress bar, model summary or sanity check."""
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(max_epochs=max_epochs, **{**defaults, **kwargs})


@contextlib.contextmanager
def quiet_lightning():
    """Silence Lightning's per-Trainer info lines (GPU available, ...) for the many short fits of a search, and
    torchmetrics' warning that a diverging fit's NaN losses are left out of its means (they reach the metrics before
    the finiteness check stops the fit; the trial's line says `diverged`)."""
    loggers = [
        logging.getLogger(n) for n in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered `nan` values in tensor", category=UserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@dataclass
class TrialRuns:
    """Each trial's own W&B run, in the study's project and under the study's group (W&B's `group=`), so the
    dashboard shows the trials side by side and the study's run with its tables beside them."""

    project: str
    group: str
    save_dir: str
    offline: bool

    @classmethod
    def of(cls, trainer: pl.Trainer) -> TrialRuns | None:
        """The settings of the study's own W&B run (None when it logs to no W&B)."""
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                # the study's run starts first: Lightning's logger would take over a trial's run open at its start
                if isinstance(logger, RunWandbLogger):
                    logger.wait()
                else:
                    logger.experiment.id  # noqa: B018 (starts it)
                init = logger._wandb_init
                group = init.get("group") or f"{init.get('name') or 'study'}-{logger.version}"
                save_dir = str(Path(logger.save_dir or ".").resolve())  # absolute: a Ray worker has its own cwd
                return cls(init.get("project") or "netlab", group, save_dir, bool(logger._offline))
        return None

    def start(self, name: str, config: dict):
        """A new W&B run for one trial, beside any run this process already has open (the study's)."""
        import wandb

        return wandb.init(
            project=self.project,
            group=self.group,
            name=name,
            job_type="trial",
            config=config,
            dir=self.save_dir,
            mode="offline" if self.offline else None,
            reinit="create_new",  # Lightning's WandbLogger would reuse the study's open run instead
        )

    def log_finished(
        self, name: str, config: dict, history: list[dict], summary: dict, step_key: str = "epoch"
    ) -> None:
        """One trial's run, logged after it trained (a stack trains its members together), each row at its
        `step_key`."""
        run = self.start(name, config)
        for row in history:
            run.log(
                {k: v for k, v in row.items() if isinstance(v, int | float) and k not in config}, step=row[step_key]
            )
        run.summary.update(summary)
        run.finish()


def portable(
    obj: pl.LightningModule | pl.LightningDataModule, device: torch.device | str = "cpu"
) -> pl.LightningModule | pl.LightningDataModule:
    """A shallow copy without its trainer (which is not sent to workers); a datamodule's splits on `device`."""
    copied = copy.copy(obj)
    copied.__dict__["_trainer" if isinstance(obj, pl.LightningModule) else "trainer"] = None
    for name, value in vars(obj).items():
        if _parsed_factory(value):  # the CLI's optimizer and scheduler factories hold its parser: keep their recipe
            copied.__dict__[name] = functools.partial(value.args[1], *value.args[2:], **value.keywords)
    if getattr(obj, "splits", None):
        copied.splits = moved_splits(obj.splits, device)
    return copied


def _parsed_factory(value) -> bool:
    """A callable argument the CLI parsed (`optimizer: OptimizerCallable`): jsonargparse's
    partial(call_without_instantiate_context, instantiator, class, **init_args), whose instantiator
    holds the CLI (and its trainer's locks), which no worker can receive."""
    return (
        isinstance(value, functools.partial)
        and getattr(value.func, "__name__", "") == "call_without_instantiate_context"
        and len(value.args) >= 2
        and isinstance(value.args[1], type)
    )


def worker_device(device: str | None) -> torch.device:
    """The device a trial was given, or (None) the worker's GPU when Ray gave it one, else the CPU."""
    return torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
