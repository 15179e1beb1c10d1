"""The health of units and representations, from the formulas of spec 06 (no Lightning import): dormant scores,
gradient-blocking shares of saturating activations, which units are dead (pass no gradient on any input),
k-winners' duty-cycle entropy, and feature rank.

Each function takes what is already reduced (per-unit sums, a matrix of features) and returns plain numbers or
tensors; the callbacks stream and reduce the inputs over batches and ranks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_modules.layers.kwinners import KWinnersBase


def summed_abs_per_unit(output: torch.Tensor) -> torch.Tensor:
    """Per unit, the sum over samples of |h| averaged over positions (a conv unit is a channel); divided by the
    samples it is the unit's E|h|."""
    magnitude = output.abs().float()
    return (magnitude.mean(dim=tuple(range(2, output.dim()))) if output.dim() > 2 else magnitude).sum(0)


def dormant_scores(mean_abs: torch.Tensor) -> torch.Tensor:
    """s_i = E|h_i| / ((1/H) sum_k E|h_k|) (Sokar et al., 2023), from each unit's E|h| over a dataset. A layer whose
    units are all silent has every score 0."""
    layer_mean = mean_abs.mean()
    if layer_mean <= 0:
        return torch.zeros_like(mean_abs)
    return mean_abs / layer_mean


def dormant_share(scores: torch.Tensor, tau: float) -> float:
    """The share of units that are tau-dormant (s_i <= tau); tau = 0 is the dead share of a ReLU layer."""
    return float((scores <= tau).float().mean()) if len(scores) else math.nan


def blocked_entries(module: nn.Module, h: torch.Tensor, eps: float = 0.05) -> torch.Tensor | None:
    """Which (sample, unit, position) entries block the gradient, |phi'(z)| <= eps, as a bool mask of h's shape,
    from the outputs h = phi(z), where each slope is known (tanh: 1 - h^2, so |z| >= 2.18; ELU: h + alpha below 0,
    so z <= -3.0; ReLU: 0 where h = 0, so z <= 0, its "off" entries); None when the module is not one of those
    activations. From the outputs, an in-place activation needs no copy of its input."""
    if eps >= 1 and isinstance(module, (nn.Tanh, nn.ELU, nn.ReLU)):
        return torch.ones_like(h, dtype=torch.bool)  # no slope of these exceeds 1
    if isinstance(module, nn.Tanh):
        return h.abs() >= math.sqrt(1 - eps)
    if isinstance(module, nn.ELU):
        return h <= min(eps - module.alpha, 0.0)
    if isinstance(module, nn.ReLU):
        return h <= 0
    return None


def dead_rule(module: nn.Module) -> str:
    """How a unit of `module` is found dead, that is passing no gradient on any input: tanh and ELU 'saturated'
    (|phi'(z)| <= eps on every entry), k-winners 'never wins', ReLU and any other module 'off' (its output never
    above the threshold, 0: a ReLU's gradient is exactly 0 there)."""
    if isinstance(module, (nn.Tanh, nn.ELU)):
        return "saturated"
    return "never wins" if isinstance(module, KWinnersBase) else "off"


def passing_units(module: nn.Module, h: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor | None:
    """Per unit (dim 1; a conv unit is a channel), whether some entry of this batch passes gradient: for tanh and ELU
    an entry that `blocked` (their `blocked_entries`) leaves open, for k-winners a win (h != 0: losers output 0
    exactly); None for the units whose rule is 'off', which is read from their peak."""
    rule = dead_rule(module)
    if rule == "off":
        return None
    passing = ~blocked if rule == "saturated" else h != 0
    if passing.dim() > 2:
        passing = passing.flatten(2).any(dim=2)
    return passing.any(dim=0) if passing.dim() > 1 else passing


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """-(p log2 p + (1 - p) log2(1 - p)) elementwise, with 0 log 0 = 0."""
    p = p.double().clamp(0, 1)
    q = 1 - p
    return -(torch.xlogy(p, p) + torch.xlogy(q, q)) / math.log(2)


def duty_cycle_entropy(duty_cycles: torch.Tensor, percent_on: float) -> tuple[float, float]:
    """(E, H_max): the mean binary entropy of a k-winners layer's duty cycles, and its maximum for that layer's
    sparsity p. E near H_max: units win equally often; much lower: a few units take all the wins."""
    entropy = float(binary_entropy(duty_cycles.flatten()).mean())
    return entropy, float(binary_entropy(torch.tensor(percent_on)))


def singular_values(features: torch.Tensor) -> torch.Tensor:
    """The singular values of an (n, H) matrix, largest first, in float64: the square roots of the eigenvalues of
    its smaller Gram matrix, six times faster than an SVD of 2,048 x 256 on a CPU and exact to float64 rounding for
    every value that moves a sum of them (a value below 1e-8 of the largest comes out near 0)."""
    f = features.double()
    gram = f.T @ f if f.shape[0] >= f.shape[1] else f @ f.T
    return torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().flip(0)


def effective_rank(features: torch.Tensor | None = None, sigma: torch.Tensor | None = None) -> float:
    """exp(-sum p_i log p_i), p_i = sigma_i / sum sigma, over the singular values of an (n, H) feature matrix
    (Roy & Vetterli, 2007); `sigma` if they are already known."""
    sigma = singular_values(features) if sigma is None else sigma
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total
    return float(torch.exp(-torch.xlogy(p, p).sum()))


def srank(features: torch.Tensor | None = None, delta: float = 0.01, sigma: torch.Tensor | None = None) -> int:
    """The least k whose top k singular values hold (1 - delta) of their sum (Kumar et al., 2021); `sigma` if they
    are already known (largest first)."""
    sigma = singular_values(features) if sigma is None else sigma
    total = sigma.sum()
    if total <= 0:
        return 0
    held = torch.cumsum(sigma, 0) >= (1 - delta) * total
    return int(torch.nonzero(held)[0]) + 1
