"""Per-task accuracy of a task stream (spec 07): online accuracy over the training batches of each task as they are
trained on, and final accuracy at each task's end, logged with the task's index."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from callbacks.activation_observer import log_now
from datamodules.task_stream import TaskStream
from lightning_modules.collectives import sum_over_ranks
from lightning_modules.errors import ConfigError


class TaskAccuracy(pl.Callback):
    """At each validation of a TaskStream run (one per task end) logs `task/index`, `task/acc_online` (the mean
    accuracy of the task's training batches, counted on the device on every rank and summed over ranks) and
    `task/acc_final` (the validation accuracy of the task just trained; random labels: on the labelled subset).
    Needs the Classifier's `net` (its logits are counted through a forward hook) and a TaskStream datamodule."""

    def __init__(self) -> None:
        self.correct: torch.Tensor | None = None  # this rank's correct predictions and samples in the current task
        self.seen: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.task = 0
        self._hook = None
        self._saved: dict | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(trainer.datamodule, TaskStream):
            raise ConfigError("TaskAccuracy measures a task stream: use it with data: datamodules.TaskStream")
        device = pl_module.device
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.seen = torch.zeros((), dtype=torch.long, device=device)
        if self._saved is not None:  # a resumed stream: the counts of its task so far, this rank's
            self.correct += self._saved["correct"]
            self.seen += self._saved["seen"]
            self.task = self._saved["task"]
            self._saved = None
        self._hook = pl_module.net.register_forward_hook(self._count)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.labels = batch[1]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.labels = None

    def _count(self, module, inputs, logits: torch.Tensor) -> None:
        if self.labels is not None and module.training:
            self.correct += (logits.detach().argmax(dim=1) == self.labels).sum()
            self.seen += len(self.labels)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.seen is None:
            return
        task = trainer.datamodule.trained_task()
        correct, seen = sum_over_ranks([self.correct, self.seen])
        values = {
            "task/index": float(task),
            "task/acc_online": float(correct / seen) if seen else float("nan"),
            "task/acc_final": float(trainer.callback_metrics["val/acc"]),
        }
        if trainer.is_global_zero:
            log_now(trainer, values)  # at the validation's step: beside val/acc and the dead units
        self.correct.zero_()
        self.seen.zero_()
        self.task = task + 1

    def state_dict(self) -> dict:
        if self.correct is None:
            return {}
        return {"correct": self.correct.cpu(), "seen": self.seen.cpu(), "task": self.task}

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved = state_dict or None
