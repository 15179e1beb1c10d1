"""Factorised 1x1 convolutions, the pointwise parts of `TensorTrain_r`, `Tucker_r` and `CP_r`.

The out x in weight is seen as a 3-mode tensor (out, a, b), with in = a * b split as evenly as
in allows, and kept in factorised form: a tensor train, a Tucker core with three factor
matrices, or a CP sum of rank-one terms. The forward contracts the factors with each position's
input in a fixed order (no dense weight is formed), so the mult-adds counted are exactly those of
that order; for the tensor train this is an upper bound on its cost (another contraction order, or
forming the dense weight once per batch, can be cheaper), and `count` says so.

Ranks scale with r in (0, 1]: a tensor train's and Tucker's are r times the ranks that represent
every weight exactly; CP's is int(r * max(in, out)), as Generic's rank.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def split_modes(channels: int) -> tuple[int, int]:
    """in = a * b with a the largest divisor of in at most sqrt(in): 640 -> (20, 32), 16 -> (4, 4)."""
    a = max(d for d in range(1, math.isqrt(channels) + 1) if channels % d == 0)
    return a, channels // a


def _rank(r: float, full: int) -> int:
    if not 0 < r <= 1:
        raise ValueError(f"a factorised 1x1 conv scales its ranks by r in (0, 1], got {r}")
    return max(1, min(full, int(r * full)))


class FactorizedPointwise(nn.Module):
    """Shared plumbing: stride, channels-last positions (P, a, b), a Kaiming-matched init of the factors."""

    count_note: str | None = None

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
        self.a, self.b = split_modes(in_ch)

    def init_factors(self, terms: int) -> None:
        """Draw every factor N(0, sigma^2) so the implied dense weight has the full conv's variance
        2 / out (Kaiming, fan out): a sum of `terms` products of all factors."""
        factors = list(self.parameters())
        sigma = (2.0 / self.out_ch / terms) ** (1 / (2 * len(factors)))
        for p in factors:
            nn.init.normal_(p, std=sigma)

    def contract(self, x: torch.Tensor) -> torch.Tensor:
        """(P, a, b) inputs -> (P, out) outputs."""
        raise NotImplementedError

    def per_position(self) -> int:
        """Mult-adds of `contract` per position."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        n, _, h, w = x.shape
        y = self.contract(x.permute(0, 2, 3, 1).reshape(n * h * w, self.a, self.b))
        return y.view(n, h, w, self.out_ch).permute(0, 3, 1, 2)

    def mult_adds(self, output: torch.Tensor) -> int:
        return output[0].numel() // self.out_ch * self.per_position()


class TensorTrainPointwise(FactorizedPointwise):
    """W[o, i, j] = sum over r1, r2 of G1[o, r1] G2[r1, i, r2] G3[r2, j]; ranks r * (min(out, in), min(out * a, b))."""

    count_note = (
        "TensorTrain: mult-adds are those of this code's contraction order (input with G3, then G2, then G1), "
        "an upper bound on the tensor train's cost"
    )

    def __init__(self, in_ch: int, out_ch: int, r: float = 0.25, stride: int = 1):
        super().__init__(in_ch, out_ch, stride)
        self.ranks = (_rank(r, min(out_ch, in_ch)), _rank(r, min(out_ch * self.a, self.b)))
        r1, r2 = self.ranks
        self.g1 = nn.Parameter(torch.empty(out_ch, r1))
        self.g2 = nn.Parameter(torch.empty(r1, self.a * r2))
        self.g3 = nn.Parameter(torch.empty(self.b, r2))
        self.init_factors(r1 * r2)

    def contract(self, x: torch.Tensor) -> torch.Tensor:
        t = (x @ self.g3).flatten(1)  # (P, a * r2)
        return (t @ self.g2.T) @ self.g1.T

    def per_position(self) -> int:
        r1, r2 = self.ranks
        return self.a * self.b * r2 + self.a * r2 * r1 + r1 * self.out_ch

    def extra_repr(self) -> str:
        return f"{self.in_ch}, {self.out_ch}, modes=({self.out_ch}, {self.a}, {self.b}), ranks={self.ranks}"


class TuckerPointwise(FactorizedPointwise):
    """W[o, i, j] = sum of core[p, q, s] U1[o, p] U2[i, q] U3[j, s]; ranks r * the full Tucker ranks."""

    def __init__(self, in_ch: int, out_ch: int, r: float = 0.25, stride: int = 1):
        super().__init__(in_ch, out_ch, stride)
        a, b = self.a, self.b
        self.ranks = (_rank(r, min(out_ch, a * b)), _rank(r, min(a, out_ch * b)), _rank(r, min(b, out_ch * a)))
        r1, r2, r3 = self.ranks
        self.u1 = nn.Parameter(torch.empty(out_ch, r1))
        self.u2 = nn.Parameter(torch.empty(a, r2))
        self.u3 = nn.Parameter(torch.empty(b, r3))
        self.core = nn.Parameter(torch.empty(r1, r2 * r3))
        self.init_factors(r1 * r2 * r3)

    def contract(self, x: torch.Tensor) -> torch.Tensor:
        t = x @ self.u3  # (P, a, r3)
        t = (self.u2.T @ t).flatten(1)  # (P, r2 * r3)
        return (t @ self.core.T) @ self.u1.T

    def per_position(self) -> int:
        r1, r2, r3 = self.ranks
        return self.a * self.b * r3 + self.a * r2 * r3 + r1 * r2 * r3 + r1 * self.out_ch

    def extra_repr(self) -> str:
        return f"{self.in_ch}, {self.out_ch}, modes=({self.out_ch}, {self.a}, {self.b}), ranks={self.ranks}"


class CPPointwise(FactorizedPointwise):
    """W[o, i, j] = sum over k of U1[o, k] U2[i, k] U3[j, k]; rank int(r * max(in, out))."""

    def __init__(self, in_ch: int, out_ch: int, r: float = 0.25, stride: int = 1):
        super().__init__(in_ch, out_ch, stride)
        if not 0 < r <= 1:
            raise ValueError(f"a factorised 1x1 conv scales its ranks by r in (0, 1], got {r}")
        self.rank = max(1, int(r * max(in_ch, out_ch)))
        self.u1 = nn.Parameter(torch.empty(out_ch, self.rank))
        self.u2 = nn.Parameter(torch.empty(self.a, self.rank))
        self.u3 = nn.Parameter(torch.empty(self.b, self.rank))
        self.init_factors(self.rank)

    def contract(self, x: torch.Tensor) -> torch.Tensor:
        t = x @ self.u3  # (P, a, rank)
        t = torch.einsum("pak,ak->pk", t, self.u2)
        return t @ self.u1.T

    def per_position(self) -> int:
        return self.a * self.b * self.rank + self.a * self.rank + self.rank * self.out_ch

    def extra_repr(self) -> str:
        return f"{self.in_ch}, {self.out_ch}, modes=({self.out_ch}, {self.a}, {self.b}), rank={self.rank}"
