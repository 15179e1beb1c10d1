"""A compressed student trained from a frozen teacher: task loss plus attention transfer (research line 4).

loss = CE (or, with kd_alpha > 0, Hinton's knowledge distillation at temperature T)
       + beta * sum over taps of at_loss(student tap, teacher tap),  beta = 1e3 as in the spec.
The teacher is a net of this framework loaded from its checkpoint with `weights_only=True`,
frozen, in eval mode and under no_grad. Its weights are not written into the student's
checkpoints (the student reloads them from `teacher_checkpoint`), so a resumed run finds them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric

from callbacks.attention_transfer import AttentionTransfer
from lightning_modules.checkpoints import load_net
from lightning_modules.classifier import ConfigError
from lightning_modules.compressed import Compressed


def load_teacher(teacher: nn.Module, path: str | Path) -> None:
    """Load a teacher's weights from a checkpoint of this framework (its `net.*` entries) or a plain state dict."""
    if not Path(path).is_file():
        raise ConfigError(
            f"teacher checkpoint {path} not found: train the teacher first (e.g. python train.py fit --config "
            "configs/compression/wrn28_10.yaml) and set model.init_args.teacher_checkpoint to its last.ckpt"
        )
    load_net(teacher, path, "teacher checkpoint")


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: T^2 KL(softmax(teacher / T) || softmax(student / T)), mean over samples."""
    return (
        F.kl_div(
            F.log_softmax(logits / temperature, dim=1),
            F.log_softmax(teacher_logits / temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )


class Student(Compressed):
    """Trains `net` (a student) with attention transfer from a frozen `teacher`; logs `<split>/at_g1` ... per tap."""

    def __init__(
        self,
        net: nn.Module,
        teacher: nn.Module,
        teacher_checkpoint: str | None = None,
        beta: float = 1e3,
        taps: Sequence[str] = ("group1", "group2", "group3"),
        kd_alpha: float = 0.0,
        kd_temperature: float = 4.0,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scaled_weight_decay: bool = True,
        param_groups: dict[str, dict[str, float]] | None = None,
        num_classes: int = 10,
        channels_last: bool = True,
        finite_check_every: int = 50,
    ):
        """
        Args:
            net: the student, e.g. a `WideResNet` with `conv: Shuffle_4`.
            teacher: the teacher's net, built as it was trained (e.g. `WideResNet` with `conv: Conv`).
            teacher_checkpoint: the teacher's weights: a checkpoint of this framework (`last.ckpt` of the
                teacher's run) or a saved state dict; loaded with `weights_only=True`.
            beta: weight of the summed attention-transfer losses (0: train without them, still logged).
            taps: modules of both nets whose outputs are compared (the three WRN groups).
            kd_alpha: weight of the distillation loss against the teacher's soft targets (0: plain CE).
            kd_temperature: softmax temperature T of the distillation loss.
            optimizer: builds the optimizer over the student's parameters.
            scheduler: builds an lr scheduler from the optimizer, stepped once per epoch.
            scaled_weight_decay: scale each substitute's weight decay by its compression ratio.
            param_groups: optimizer options per parameter-name pattern.
            num_classes: classes of the task.
            channels_last: keep 4-D weights and inputs in NHWC memory order.
            finite_check_every: check every this many steps that the loss stayed finite.
        """
        super().__init__(
            net, optimizer, scheduler, scaled_weight_decay, param_groups, num_classes, channels_last, finite_check_every
        )
        self.teacher = teacher.requires_grad_(False).eval()
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher_loaded = False
        self.beta, self.kd_alpha, self.kd_temperature = beta, kd_alpha, kd_temperature
        self.attention = AttentionTransfer(taps)
        self.tap_keys = [f"at_g{i}" for i in range(1, len(self.attention.taps) + 1)]
        for split in ("train", "val", "test"):
            metrics = getattr(self, f"{split}_metrics")
            for key in ("task", *self.tap_keys):
                metrics[key] = MeanMetric()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not 0 <= self.kd_alpha <= 1:  # checked here, not in __init__: the CLI shows it as one line
            raise ConfigError(f"kd_alpha weighs distillation against CE and lies in [0, 1], got {self.kd_alpha}")
        if not self.teacher_loaded:
            if self.teacher_checkpoint is None:
                raise ConfigError("a student needs its teacher's weights: set model.init_args.teacher_checkpoint")
            load_teacher(self.teacher, self.teacher_checkpoint)
            self.teacher_loaded = True
        if self.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        # Lightning warns of modules left in eval mode at fit start: the teacher's are, on purpose
        frozen = sum(1 for _ in self.teacher.modules())
        warnings.filterwarnings("ignore", message=rf"Found {frozen} module\(s\) in eval mode")
        try:
            self.attention.attach(self.net, self.teacher)
        except ValueError as e:
            raise ConfigError(f"attention-transfer taps: {e}") from e

    def train(self, mode: bool = True) -> Student:
        """Lightning switches the whole module to training each epoch: the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        x, y = batch
        x = self.as_input(x)
        logits = self.net(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        transfer = self.attention.losses()
        task = F.cross_entropy(logits, y)
        if self.kd_alpha:
            soft = distillation_loss(logits, teacher_logits, self.kd_temperature)
            task = (1 - self.kd_alpha) * task + self.kd_alpha * soft
        loss = task + self.beta * torch.stack(list(transfer.values())).sum()
        metrics = getattr(self, f"{split}_metrics")
        metrics["acc"].update(logits.detach(), y)
        metrics["loss"].update(loss.detach(), weight=len(y))
        metrics["task"].update(task.detach(), weight=len(y))
        for key, value in zip(self.tap_keys, transfer.values(), strict=True):
            metrics[key].update(value.detach(), weight=len(y))
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Leave the frozen teacher out: it is reloaded from `teacher_checkpoint`."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
