"""Drop-in subclasses of nn.ELU and nn.BatchNorm2d that run the depth nets' small maps faster on a CPU, with the
same results up to float rounding (on a GPU they are the parents).

Measured on a 2-core CPU (benchmarks/README.md, `depth_step.py`): PyTorch's CPU ELU spends its time in `expm1`, about
17x slower than `exp` per element; its batch norm on channels-last maps of 4 to 8 channels is 3-6x slower than on the
same map in NCHW order, while the convolutions around it run faster channels-last.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class _ExpELU(torch.autograd.Function):
    """ELU with alpha in (0, 1] as max(x, alpha (exp(min(x, 0)) - 1)): on x > 0 the second term is 0 < x, on x <= 0
    it is >= x (exp(x) >= 1 + x), so the maximum is the ELU; four vectorised passes. The backward is PyTorch's own ELU
    backward from the output, as F.elu's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        negative = x.clamp(max=0).exp_().sub_(1)
        if alpha != 1.0:
            negative.mul_(alpha)
        out = torch.maximum(x, negative)
        ctx.save_for_backward(out)
        ctx.alpha = alpha
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (out,) = ctx.saved_tensors
        return torch.ops.aten.elu_backward(grad, ctx.alpha, 1, 1, True, out), None


class ELU(nn.ELU):
    """nn.ELU; on a CPU computed from `exp` rather than `expm1` (within 6e-8 of F.elu in float32; the same backward,
    from the output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.inplace or not 0 < self.alpha <= 1:
            return super().forward(x)
        return _ExpELU.apply(x, float(self.alpha))


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d; on a CPU, a channels-last map of at most `max_channels_last` channels is normalised in NCHW
    order and returned channels-last (two copies cost less than the channels-last kernel at 4-8 channels)."""

    max_channels_last = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reorder = (
            x.device.type == "cpu"
            and x.dim() == 4
            and x.shape[1] <= self.max_channels_last
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
        )
        if not reorder:
            return super().forward(x)
        return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)


def with_pytorch_modules(net: nn.Module) -> nn.Module:
    """A copy of `net` with PyTorch's own nn.ELU and nn.BatchNorm2d in place of these (the same parameters and
    buffers): what it computed before them, for comparisons and benchmarks."""
    net = copy.deepcopy(net)
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if type(child) is ELU:
                setattr(parent, name, nn.ELU(child.alpha, child.inplace))
            elif type(child) is BatchNorm2d:
                stock = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)  # fmt: skip
                stock.load_state_dict(child.state_dict())
                setattr(parent, name, stock.to(child.weight.device if child.affine else "cpu"))
    return net
