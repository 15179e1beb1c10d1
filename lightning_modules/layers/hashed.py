"""A 1x1 convolution with hashed weight sharing (HashedNets, Chen et al. 2015), the pointwise part of `SepHashed_s`.

Its in x out virtual weights index `int(in * out * s)` real ones: a hash of the weight's position
picks its bucket and a second hash its sign, so colliding weights do not all pull one way. The
hashes are recomputed from the shapes (not saved), and the compute is that of the dense 1x1 conv.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def position_hash(index: torch.Tensor, seed: int) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) of non-negative int64 positions, different for each seed."""
    mask = 0xFFFFFFFF
    x = (index + seed * 0x9E3779B9) & mask
    for multiplier in (0x7FEB352D, 0x846CA68B):
        x = ((x ^ (x >> 16)) * multiplier) & mask
    return x ^ (x >> 16)


class HashedPointwise(nn.Module):
    """A 1x1 conv (in -> out, optional stride) whose in*out weights share `int(in*out*s)` hashed buckets,
    plus an output bias (the original's hashed conv has one: 8,960 parameters on WRN-28-10)."""

    def __init__(self, in_ch: int, out_ch: int, s: float = 0.1, stride: int = 1, bias: bool = True):
        super().__init__()
        if not 0 < s <= 1:
            raise ValueError(f"SepHashed keeps a fraction s in (0, 1] of the 1x1 weights, got {s}")
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
        buckets = max(1, int(in_ch * out_ch * s))
        self.weight = nn.Parameter(torch.empty(buckets))
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / out_ch))  # the full conv's init (Kaiming, fan out)
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        position = torch.arange(out_ch * in_ch).view(out_ch, in_ch)
        self.register_buffer("bucket", position_hash(position, seed=1) % buckets, persistent=False)
        self.register_buffer("sign", 1.0 - 2.0 * (position_hash(position, seed=2) & 1).float(), persistent=False)

    def virtual_weight(self) -> torch.Tensor:
        """The (out, in, 1, 1) weight the conv applies."""
        return (self.weight[self.bucket] * self.sign).view(self.out_ch, self.in_ch, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.virtual_weight(), self.bias, stride=self.stride)

    def mult_adds(self, output: torch.Tensor) -> int:
        """Per sample: the dense 1x1 conv's (sharing saves parameters, not compute; a conv's bias counts 0)."""
        return output[0].numel() * self.in_ch

    def extra_repr(self) -> str:
        return f"{self.in_ch}, {self.out_ch}, buckets={self.weight.numel()}, stride={self.stride}, bias={self.bias is not None}"
