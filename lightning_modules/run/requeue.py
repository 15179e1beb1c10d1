"""SLURM auto-requeue: on the time-limit signal a run saves a checkpoint into its own folder at the next
consistent point (the end of a training batch), requeues its job and stops; the requeued job (same job
id) finds that folder by its job id and resumes from the checkpoint, without `--ckpt_path`."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment

from lightning_modules.run.console import say
from lightning_modules.run.run_folder import run_folder, versions

JOB_FILE = "slurm_job_id"  # in the run folder: the SLURM job that trains it
CHECKPOINT = "requeue.ckpt"  # in the run folder's checkpoints/: where the signal found the run


class Requeued(BaseException):
    """The run saved its requeue checkpoint and asked SLURM to requeue its job: this process ends here."""


def slurm_job_id() -> str | None:
    """This process's SLURM job (`<array job>_<task>` for an array task), or None outside a SLURM batch job."""
    if not SLURMEnvironment.detect():
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")


def requeued_checkpoint(root: Path, job: str) -> Path | None:
    """The checkpoint a requeued job resumes from: the newer of its run folder's requeue.ckpt and last.ckpt."""
    for folder in reversed(versions(root)):
        marker = folder / JOB_FILE
        if marker.is_file() and marker.read_text().strip() == job:
            found = [
                p for p in (folder / "checkpoints" / CHECKPOINT, folder / "checkpoints" / "last.ckpt") if p.is_file()
            ]
            return max(found, key=lambda p: p.stat().st_mtime) if found else None
    return None


class Requeue(pl.Callback):
    """Catches SLURM's time-limit signal (`#SBATCH --signal=SIGUSR1@90`), then at the end of the next training
    batch (every `check_every` batches under DDP, where ranks agree by one all-reduce) saves `requeue.ckpt`,
    runs `scontrol requeue <job>` and ends the process."""

    def __init__(self, job: str, signum: int = signal.SIGUSR1, check_every: int = 20):
        self.job, self.signum, self.check_every = job, signum, check_every
        self.requested = False
        self.folder: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        signal.signal(self.signum, self._request)
        self.folder = run_folder(trainer)  # on every rank: a broadcast under DDP
        if trainer.is_global_zero and self.folder is not None:
            (self.folder / JOB_FILE).write_text(self.job)

    def _request(self, signum, frame) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.world_size > 1:
            if (batch_idx + 1) % self.check_every:
                return
            self.requested = trainer.strategy.reduce_boolean_decision(self.requested, all=False)
        if not self.requested:
            return
        path = (self.folder or Path(trainer.default_root_dir)) / "checkpoints" / CHECKPOINT
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            code = subprocess.call(["scontrol", "requeue", self.job])
            say(f"SLURM: saved {path} and {'requeued' if code == 0 else 'could not requeue'} job {self.job}")
        raise Requeued(self.job)
