"""The health of units and representations, from the formulas of spec 06 (no Lightning import): dormant scores,
gradient-blocking shares of saturating activations, k-winners' duty-cycle entropy, and feature rank.

Each function takes what is already reduced (per-unit sums, a matrix of features) and returns plain numbers or
tensors; the callbacks stream and reduce the inputs over batches and ranks.
"""

from __future__ import annotations

import math

import torch
from torch import nn


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


def blocked_count(module: nn.Module, h: torch.Tensor, eps: float = 0.05) -> torch.Tensor | None:
    """How many (sample, unit, position) entries block the gradient, |phi'(z)| <= eps, counted from the outputs
    h = phi(z), where each slope is known (tanh: 1 - h^2, so |z| >= 2.18; ELU: h + alpha below 0, so z <= -3.0;
    ReLU: 0 where h = 0, so z <= 0, its "off" share, not the dead share); a 0-d tensor on h's device, or None when
    the module is not one of those activations. From the outputs, an in-place activation needs no copy of its
    input, and the count costs one pass over what the dead-unit count reads anyway."""
    if eps >= 1 and isinstance(module, (nn.Tanh, nn.ELU, nn.ReLU)):
        return torch.tensor(h.numel(), device=h.device)  # no slope of these exceeds 1
    if isinstance(module, nn.Tanh):  # count_nonzero of a mask: twice as fast as its sum on a CPU
        return torch.count_nonzero(h.abs() >= math.sqrt(1 - eps))
    if isinstance(module, nn.ELU):
        return torch.count_nonzero(h <= min(eps - module.alpha, 0.0))
    if isinstance(module, nn.ReLU):
        return torch.count_nonzero(h <= 0)
    return None


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
