"""A run's state, decided once by the CLI before anything is built: its name, its folder, whether it continues one,
the checkpoint it starts from and its W&B run. The loggers, the config saver, the Trainer and the studies read it
from here (`trainer.run`); nothing else carries these facts."""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl

from lightning_modules.run.checkpoints import check_version, read_checkpoint, state_dict_of
from lightning_modules.run.loggers import RunWandbLogger
from lightning_modules.run.run_folder import discard, untrained, wandb_run_id


@dataclass(frozen=True)
class Checkpoint:
    """The checkpoint a run starts from: its path, the weights it holds (to check against the model once it is
    built) and its position: the epoch, the global step, and the step of the last row it had logged (a resumed run's
    metrics continue after it; one less than the global step in a checkpoint saved at a validation mid-epoch)."""

    path: Path
    keys: frozenset[str]
    epoch: int
    step: int
    logged_step: int

    @classmethod
    def read(cls, path: str | Path) -> Checkpoint:
        """Read a checkpoint's keys and position; an unusable file is one ConfigError line naming it."""
        checkpoint = read_checkpoint(path)
        check_version(checkpoint, path)
        keys = frozenset(state_dict_of(checkpoint, path))
        step = int(checkpoint.get("global_step", 0))
        loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
        logged = int(loop.get("_batches_that_stepped", step))  # Lightning's logging step
        return cls(Path(path), keys, int(checkpoint.get("epoch", 0)), step, logged)


def new_run_id() -> str:
    """A W&B run id (8 characters of [a-z0-9], as W&B makes them), known before W&B starts."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


@dataclass
class Run:
    """One invocation of `train.py`.

    `folder` is the run folder it continues (a fit resumed from its checkpoint, a killed study started again), or
    None for a new `root/name/version_N`, whose path the loggers choose and record in `new_folder`. `wandb_id` is
    the W&B run it logs to: the continued folder's (`wandb_run_id`), else a new one.
    """

    name: str
    root: Path
    folder: Path | None = None
    checkpoint: Checkpoint | None = None
    wandb_id: str = field(default_factory=new_run_id)
    resumes_wandb: bool = False
    new_folder: Path | None = None

    @classmethod
    def start(cls, name: str, root: Path, folder: Path | None, checkpoint: Checkpoint | None) -> Run:
        recorded = wandb_run_id(folder)
        return cls(name, root, folder, checkpoint, recorded or new_run_id(), recorded is not None)

    @property
    def continues(self) -> bool:
        """Whether it continues an existing folder (its config, metrics and W&B run) instead of starting one."""
        return self.folder is not None

    def discard_if_untrained(self, trainer: pl.Trainer) -> None:
        """After a failure: remove the run's new folder and its W&B run if nothing trained (a run that trained at
        least one step, or continues a folder, keeps everything). Rank 0 removes; no collective, on any rank."""
        if self.new_folder is None or trainer.global_step > 0 or not trainer.is_global_zero:
            return
        if untrained(self.new_folder):
            for logger in trainer.loggers:
                if isinstance(logger, RunWandbLogger):
                    logger.discard()
            discard(self.new_folder, self.root)
