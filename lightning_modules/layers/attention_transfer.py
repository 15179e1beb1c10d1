"""Attention transfer (Zagoruyko & Komodakis 2017): the loss that makes a student's attention maps match a teacher's.

at(x) = normalize(mean over channels of x^2, flattened per sample); at_loss(s, t) = mean((at(s) - at(t))^2).
`AttentionTransfer` watches named modules (taps) of a student and a teacher through forward hooks
and gives one loss per tap after both forwards. Any student LightningModule adds these to its loss;
the maps are computed where the activations are, on each device, and never gathered.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def attention_map(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) activations -> (N, H * W) attention maps: channel mean of x^2, unit L2 norm per sample
    (in float32 also under bf16/fp16 autocast, where squares of large activations lose precision)."""
    return F.normalize(x.float().pow(2).mean(1).flatten(1), dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the two attention maps (over samples and positions)."""
    if student.shape[2:] != teacher.shape[2:]:
        raise ValueError(
            f"attention transfer compares maps of one size: student {tuple(student.shape[2:])}, "
            f"teacher {tuple(teacher.shape[2:])}"
        )
    return (attention_map(student) - attention_map(teacher)).pow(2).mean()


class TapRecorder:
    """Keeps the latest output of each named module of a net (its taps), through forward hooks."""

    def __init__(self, net: nn.Module, taps: Sequence[str]):
        modules = dict(net.named_modules())
        missing = [tap for tap in taps if tap not in modules]
        if missing:
            groups = [name for name, _ in net.named_children()]
            raise ValueError(f"no module named {missing} in {type(net).__name__} to tap; its children: {groups}")
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [modules[tap].register_forward_hook(partial(self.record, tap)) for tap in taps]

    def record(self, tap: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.outputs[tap] = output

    def pop(self) -> dict[str, torch.Tensor]:
        outputs, self.outputs = self.outputs, {}
        return outputs

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class AttentionTransfer:
    """Attention-transfer losses at the same taps of a student and a teacher.

    `attach(student, teacher)` once; then after each pair of forward passes `losses()` gives
    {tap: at_loss} in tap order, and forgets the activations.
    """

    def __init__(self, taps: Sequence[str] = ("group1", "group2", "group3")):
        self.taps = tuple(taps)
        self.student: TapRecorder | None = None
        self.teacher: TapRecorder | None = None

    def attach(self, student: nn.Module, teacher: nn.Module) -> None:
        """Hook the taps of both nets (again: replaces earlier hooks)."""
        self.detach()
        self.student, self.teacher = TapRecorder(student, self.taps), TapRecorder(teacher, self.taps)

    def detach(self) -> None:
        for recorder in (self.student, self.teacher):
            if recorder is not None:
                recorder.remove()
        self.student = self.teacher = None

    def losses(self) -> dict[str, torch.Tensor]:
        if self.student is None or self.teacher is None:
            raise RuntimeError("AttentionTransfer.attach(student, teacher) first")
        student, teacher = self.student.pop(), self.teacher.pop()
        if len(student) != len(self.taps) or len(teacher) != len(self.taps):
            raise RuntimeError("attention transfer needs one forward pass of both the student and the teacher")
        return {tap: attention_loss(student[tap], teacher[tap]) for tap in self.taps}
