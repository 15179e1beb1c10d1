"""Weight spectra (spec 08, Martin and Mahoney, 2021): the eigenvalues of W^T W of a layer, its spectral norm and
stable rank, and the power-law exponent of the spectrum's tail fitted as Clauset, Shalizi and Newman (2009) do."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def layer_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A layer's weight as a matrix in float64 on the CPU: a conv's (C_out, C_in, *kernel) as (C_out, C_in * k * k)."""
    return weight.detach().to("cpu", torch.float64).reshape(weight.shape[0], -1)


def eigenvalues(matrix: torch.Tensor) -> torch.Tensor:
    """The M = min(rows, columns) eigenvalues of W^T W (the squared singular values of W), ascending."""
    return torch.linalg.svdvals(matrix).square().flip(0)


@dataclass(frozen=True)
class PowerLaw:
    """p(lambda) ~ lambda^-alpha for lambda >= lambda_min, fitted to the `tail` largest eigenvalues with a
    Kolmogorov-Smirnov distance `ks` between their empirical CDF and the fitted one."""

    alpha: float
    lambda_min: float
    ks: float
    tail: int


NO_FIT = PowerLaw(math.nan, math.nan, math.nan, 0)


CHUNK = 256  # candidates at once: memory of CHUNK x M doubles


def ks_distances(logs: torch.Tensor, i: torch.Tensor, alpha: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """For candidates `i` (lambda_min = x_i, the tail x_i.. of n values) the KS distance between the fitted CDF
    1 - (x_j / x_i)^(1 - alpha) at each tail value x_j and the empirical one, which steps from (j - i) / n to
    (j - i + 1) / n there."""
    rank = (torch.arange(len(logs))[None, :] - i[:, None]).to(torch.float64)
    fitted = 1 - torch.exp((1 - alpha[:, None]) * (logs[None, :] - logs[i][:, None]))
    gap = torch.maximum(fitted - rank / n[:, None], (rank + 1) / n[:, None] - fitted)
    return torch.where(rank >= 0, gap, torch.zeros(())).amax(dim=1)


def power_law(values: torch.Tensor, min_tail: int = 10) -> PowerLaw:
    """The maximum-likelihood alpha = 1 + n / sum ln(lambda_i / lambda_min) over the n values at or above lambda_min,
    for the lambda_min among the values that minimises the KS distance, over tails of at least `min_tail` values
    (fewer positive values than that: no fit, NaN). Every candidate is tried (O(M^2) time, in chunks)."""
    x = values[values > 0].to(torch.float64).sort().values
    m = len(x)
    if m < min_tail:
        return NO_FIT
    candidates = torch.arange(m - min_tail + 1)  # lambda_min = x[i]: the tail is x[i:], n = m - i values
    n = (m - candidates).to(torch.float64)
    logs = torch.log(x)
    suffix = torch.flip(torch.cumsum(torch.flip(logs, [0]), 0), [0])  # sum_{j >= i} ln x_j
    alpha = 1 + n / (suffix[candidates] - n * logs[candidates])
    ks = torch.cat([ks_distances(logs, i, alpha[i], n[i]) for i in candidates.split(CHUNK)])
    ks = torch.where(torch.isfinite(alpha), ks, torch.full((), math.inf))  # equal values: no finite alpha
    best = int(ks.argmin())
    if not math.isfinite(float(ks[best])):
        return NO_FIT
    return PowerLaw(float(alpha[best]), float(x[best]), float(ks[best]), int(n[best]))


@dataclass(frozen=True)
class Spectrum:
    """One layer's spectral measures (spec 08)."""

    spectral_norm: float  # ||W||_2 = sqrt(lambda_max)
    stable_rank: float  # ||W||_F^2 / ||W||_2^2
    fit: PowerLaw
    eigenvalues: torch.Tensor  # of W^T W, ascending, for the density plot

    @property
    def weighted_alpha(self) -> float:
        """alpha * log10(lambda_max)."""
        return self.fit.alpha * math.log10(self.spectral_norm**2) if self.spectral_norm > 0 else math.nan


def spectrum(weight: torch.Tensor, min_tail: int = 10) -> Spectrum:
    """The spectral measures of one layer's weight (float64, CPU)."""
    values = eigenvalues(layer_matrix(weight))
    top = float(values[-1]) if len(values) else 0.0
    stable = float(values.sum() / top) if top > 0 else math.nan
    return Spectrum(math.sqrt(top), stable, power_law(values, min_tail), values)
