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
from torch import nn
from torchmetrics import MeanMetric

from lightning_modules.compressed import Compressed
from lightning_modules.errors import ConfigError, require
from lightning_modules.layers.attention_transfer import AttentionTransfer
from lightning_modules.run.checkpoints import load_net
from lightning_modules.run.run_folder import run_folder_of


def load_teacher(teacher: nn.Module, path: str | Path) -> None:
    """Load a teacher's weights from a checkpoint of this framework (its `net.*` entries) or a plain state dict."""
    if not Path(path).is_file():
        raise ConfigError(f"teacher checkpoint {path} not found: {teacher_hint(Path(path))}")
    load_net(teacher, path, "teacher checkpoint")


SET_TEACHER = "point model.init_args.teacher_checkpoint at the teacher's last.ckpt"


def teacher_hint(path: Path) -> str:
    """How to get a missing teacher: the config whose run folder the path names (runs/<name>/version_N/...)."""
    folder = run_folder_of(path)
    parts = folder.parent.parts if folder is not None else ()
    if "runs" in parts:
        config = Path("configs", *parts[len(parts) - parts[::-1].index("runs") :]).with_suffix(".yaml")
        if config.is_file():
            return f"train the teacher first (python train.py fit --config {config}), or {SET_TEACHER}"
    return f"train the teacher first, or {SET_TEACHER}"


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
        **kwargs,
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
            **kwargs: Compressed's and the Classifier's settings (scaled_weight_decay, optimizer over the
                student's parameters, scheduler, the divergence guard, ...).
        """
        require("non_negative", beta=beta)
        require("fraction", kd_alpha=kd_alpha)
        require("positive", kd_temperature=kd_temperature)
        super().__init__(net, **kwargs)
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

    def task_loss(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, or with `kd_alpha` mixed with the teacher's soft targets; the teacher's forward pass (under
        no_grad) also fills the attention-transfer taps for `extra_loss`."""
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        task = F.cross_entropy(logits, y)
        if self.kd_alpha:
            soft = distillation_loss(logits, teacher_logits, self.kd_temperature)
            task = (1 - self.kd_alpha) * task + self.kd_alpha * soft
        return task

    def extra_loss(self, x, logits, y, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """beta times the attention-transfer losses summed over the taps; each tap's loss logged (`at_g1`, ...)."""
        transfer = self.attention.losses()
        logged = dict(zip(self.tap_keys, transfer.values(), strict=True))
        return self.beta * torch.stack(list(transfer.values())).sum(), logged

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Leave the frozen teacher out: it is reloaded from `teacher_checkpoint`."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
