"""A callback that kills its own process with SIGKILL mid-epoch, as a crash or an OOM killer would."""

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
