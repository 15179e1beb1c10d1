"""Per-task accuracy of a task stream (spec 07): online accuracy over the training batches of each task as they are
trained on, final accuracy and the weight norms at each task's end, logged with the task's index."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from callbacks.activation_observer import log_now, network_of
from callbacks.training_dynamics import weighted_layers
from datamodules.task_stream import TaskStream
from lightning_modules.collectives import sum_over_ranks
from lightning_modules.errors import ConfigError


class TaskAccuracy(pl.Callback):
    """At each validation of a TaskStream run (one per task end) logs `task/index`, `task/acc_online` (the mean
    accuracy of the task's training batches, counted on the device on every rank and summed over ranks) and
    `task/acc_final` (the validation accuracy of the task just trained; random labels: on the labelled subset),
    `task/weight_norm/<layer>` (each weighted layer's weight, as TrainingDynamics names them) and
    `task/weight_norm` (all of them together: the root of the sum of their squares), the weights at the task's end.
    Needs the Classifier's `net` (its logits are counted through a forward hook) and a TaskStream datamodule."""

    def __init__(self) -> None:
        self.correct: torch.Tensor | None = None  # this rank's correct predictions and samples in the current task
        self.seen: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.task = 0
        self.layers: dict[str, torch.nn.Module] = {}  # the weighted layers whose norms are logged at task ends
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
        self.layers = weighted_layers(network_of(pl_module))

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
        norms = {f"task/weight_norm/{name}": m.weight.detach().float().norm() for name, m in self.layers.items()}
        total = torch.linalg.vector_norm(torch.stack(list(norms.values()))) if norms else torch.tensor(float("nan"))
        host = torch.stack([total, *norms.values()]).cpu().tolist()  # one transfer at a task's end
        values = {
            "task/index": float(task),
            "task/acc_online": float(correct / seen) if seen else float("nan"),
            "task/acc_final": float(trainer.callback_metrics["val/acc"]),
            "task/weight_norm": host[0],
            **dict(zip(norms, host[1:], strict=True)),
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
