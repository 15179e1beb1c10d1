"""Callbacks that signal their own process mid-epoch: SIGKILL as a crash or an OOM killer would, SIGUSR1 as
SLURM does before a time limit."""

import os
import signal

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    """Send this process `signum` before training batch `batch` of epoch `epoch`; by default SIGUSR1, SLURM's
    time-limit signal."""

    def __init__(self, epoch: int = 1, batch: int = 5, signum: int = int(signal.SIGUSR1)):
        self.epoch, self.batch, self.signum = epoch, batch, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


class KillAt(SignalAt):
    """SIGKILL before training batch `batch` of epoch `epoch` (no handler runs, nothing is flushed)."""

    def __init__(self, epoch: int = 1, batch: int = 7):
        super().__init__(epoch, batch, int(signal.SIGKILL))


class CrashAtStep(pl.Callback):
    """Raise before the training batch that would be optimizer step `step`, as a crash in the middle of a run counted
    in steps (a task stream) would: the run keeps what it wrote until then."""

    def __init__(self, step: int = 25):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"crashed before step {self.step}")
