"""Per-unit mean and variance of activations, streamed over batches and merged over ranks.

Batches add to per-unit sums of (x - shift) and (x - shift)^2 on the device, with the shift set to
the first batch's mean, so the sums stay small and nothing cancels catastrophically however large
the mean is against the spread. Ranks' results are merged with Chan, Golub and LeVeque's formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Moments:
    """Per-unit count, mean and M2 (sum of squared deviations from the mean), float64."""

    count: torch.Tensor  # () samples seen per unit (every unit sees the same samples)
    mean: torch.Tensor  # (units,)
    m2: torch.Tensor  # (units,)

    @classmethod
    def zeros(cls, units: int, device: torch.device | str = "cpu") -> Moments:
        zero = torch.zeros(units, dtype=torch.float64, device=device)
        return cls(torch.zeros((), dtype=torch.float64, device=device), zero, zero.clone())

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets of observations together (Chan et al., 1979)."""
        count = self.count + other.count
        safe = count.clamp(min=1)
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / safe)
        m2 = self.m2 + other.m2 + delta.square() * (self.count * other.count / safe)
        return Moments(count, mean, m2)

    @property
    def var(self) -> torch.Tensor:
        """Population variance per unit (M2 / count)."""
        return self.m2 / self.count.clamp(min=1)

    def pack(self) -> torch.Tensor:
        """One flat tensor (count, mean..., m2...), for a single collective over ranks."""
        return torch.cat([self.count.view(1), self.mean, self.m2])

    @classmethod
    def unpack(cls, flat: torch.Tensor) -> Moments:
        units = (len(flat) - 1) // 2
        return cls(flat[0], flat[1 : 1 + units], flat[1 + units :])


class MomentAccumulator:
    """Streams batches (N, units, *positions) into per-unit shifted sums; every position of every
    sample is an observation. A handful of elementwise ops per batch, no host sync."""

    def __init__(self):
        self.shift: torch.Tensor | None = None
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None
        self.count = 0  # observations per unit, on the host: known from shapes, no sync

    def update(self, x: torch.Tensor) -> None:
        rows = x.movedim(1, -1).reshape(-1, x.shape[1]).float()  # a view for channels_last maps
        if self.shift is None:
            self.shift = rows.mean(0)
            self.s1 = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
            self.s2 = torch.zeros_like(self.s1)
        deviation = rows - self.shift
        self.s1 += deviation.sum(0)
        self.s2 += deviation.square_().sum(0)  # in place: a second map-sized temporary costs 5x on CPU
        self.count += rows.shape[0]

    def moments(self) -> Moments:
        count = torch.tensor(float(self.count), dtype=torch.float64, device=self.s1.device)
        mean = self.shift.double() + self.s1 / max(self.count, 1)
        m2 = (self.s2 - self.s1.square() / max(self.count, 1)).clamp(min=0)
        return Moments(count, mean, m2)
