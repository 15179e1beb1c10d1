"""Callbacks that signal their own process mid-epoch: SIGKILL as a crash or an OOM killer would, SIGUSR1 as
SLURM does before a time limit."""

import os
import signal

import pytorch_lightning as pl


class KillAt(pl.Callback):
    """SIGKILL before training batch `batch` of epoch `epoch` (no handler runs, nothing is flushed)."""

    def __init__(self, epoch: int = 1, batch: int = 7):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAt(pl.Callback):
    """Send this process SLURM's time-limit signal (SIGUSR1) before training batch `batch` of epoch `epoch`."""

    def __init__(self, epoch: int = 1, batch: int = 5):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGUSR1)
