"""The health of units and representations, from the formulas of spec 06 (no Lightning import): dormant scores,
gradient-blocking shares of saturating activations, k-winners' duty-cycle entropy, and feature rank.

Each function takes what is already reduced (per-unit sums, a matrix of features) and returns plain numbers or
tensors; the callbacks stream and reduce the inputs over batches and ranks.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def mean_abs_per_unit(output: torch.Tensor) -> torch.Tensor:
    """Per sample and unit, |h| averaged over positions (a conv unit is a channel): (N, units)."""
    magnitude = output.abs().float()
    return magnitude.mean(dim=tuple(range(2, output.dim()))) if output.dim() > 2 else magnitude


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


def activation_slope(module: nn.Module, z: torch.Tensor) -> torch.Tensor | None:
    """|phi'(z)| of a tanh, ELU or ReLU module at its pre-activations; None for another kind of module."""
    if isinstance(module, nn.Tanh):
        return 1 - torch.tanh(z).square()
    if isinstance(module, nn.ELU):
        return torch.where(z > 0, torch.ones_like(z), module.alpha * torch.exp(z))
    if isinstance(module, nn.ReLU):
        return (z > 0).to(z.dtype)
    return None


def blocked_count(module: nn.Module, z: torch.Tensor, eps: float = 0.05) -> torch.Tensor | None:
    """How many (sample, unit, position) entries block the gradient, |phi'(z)| <= eps (tanh: |z| >= 2.18; ELU:
    z <= -3.0; ReLU: z <= 0, its "off" share, not the dead share), as a 0-d tensor on z's device; None when the
    module is not one of those activations."""
    slope = activation_slope(module, z.float())
    return None if slope is None else (slope <= eps).sum()


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


def effective_rank(features: torch.Tensor) -> float:
    """exp(-sum p_i log p_i), p_i = sigma_i / sum sigma, over the singular values of an (n, H) feature matrix
    (Roy & Vetterli, 2007)."""
    sigma = torch.linalg.svdvals(features.double())
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total
    return float(torch.exp(-torch.xlogy(p, p).sum()))


def srank(features: torch.Tensor, delta: float = 0.01) -> int:
    """The least k whose top k singular values hold (1 - delta) of their sum (Kumar et al., 2021)."""
    sigma = torch.linalg.svdvals(features.double())
    total = sigma.sum()
    if total <= 0:
        return 0
    held = torch.cumsum(sigma, 0) >= (1 - delta) * total
    return int(torch.nonzero(held)[0]) + 1
