"""Signal propagation through an untrained net, measured (spec 06; no Lightning import): at every activation, the
length q^l of its input (the pre-activation), the correlation c^l of two inputs' pre-activations, and the norm of
the loss's gradient there, from one forward and one backward pass over a batch of input pairs; then the depth
scales xi_c and xi_grad fitted to their geometric decay, and the trainable depth they predict, 6 min(xi_c, xi_grad)
(Schoenholz et al., 2017).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ACTIVATION_TYPES = (nn.Tanh, nn.ELU, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid)


@dataclass
class Profile:
    """One net's signals at every measured point l = 1..L (an activation's input, in forward order). `stage`
    counts the changes of the pre-activation's shape (a pool or a wider conv between two points)."""

    q: list[float]
    c: list[float]
    grad: list[float]  # the L2 norm of d loss / d z^l over the batch
    stage: list[int]

    def __len__(self) -> int:
        return len(self.q)


def activation_points(net: nn.Module) -> list[nn.Module]:
    """The modules whose input is a pre-activation: every activation of the net, in forward (registration) order."""
    return [m for m in net.modules() if isinstance(m, ACTIVATION_TYPES)]


def measure(
    net: nn.Module,
    pairs: torch.Tensor,
    labels: torch.Tensor,
    points: list[nn.Module] | None = None,
    dtype: torch.dtype = torch.float64,
) -> Profile:
    """q^l, c^l and the gradient norm at every point of a copy of `net` (training mode, as its first step sees it:
    batch norm with batch statistics), in `dtype` (float64: a vanishing signal stays measurable over hundreds of
    layers). `pairs` holds 2P inputs, pair i being rows 2i and 2i + 1; `labels` their classes for the
    cross-entropy loss. c^l is the mean over pairs of <z_a, z_b> / (|z_a| |z_b|) over units and positions."""
    if len(pairs) < 2 or len(pairs) % 2:
        raise ValueError(f"pairs must hold an even number (>= 2) of inputs, got {len(pairs)}")
    names = {id(m): n for n, m in net.named_modules(remove_duplicate=False)}
    copied = copy.deepcopy(net).to(dtype).train()
    lookup = dict(copied.named_modules(remove_duplicate=False))
    targets = activation_points(copied) if points is None else [lookup[names[id(m)]] for m in points]
    if not targets:
        raise ValueError(f"{type(net).__name__} has no activation to measure at")
    seen: list[torch.Tensor] = []

    def keep(_module: nn.Module, args: tuple) -> None:
        z = args[0]
        if z.requires_grad:
            z.retain_grad()
        seen.append(z)

    handles = [m.register_forward_pre_hook(keep) for m in targets]
    try:
        logits = copied(pairs.to(dtype))
        F.cross_entropy(logits, labels).backward()
    finally:
        for handle in handles:
            handle.remove()
    rows, stage = [], []  # per point: (q, c, gradient norm) on the device, brought to the host once
    shape = None
    for z in seen:
        flat = z.detach().flatten(1)
        a, b = flat[0::2], flat[1::2]
        norms = (a.square().sum(1) * b.square().sum(1)).sqrt()
        c = ((a * b).sum(1) / norms.clamp_min(torch.finfo(dtype).tiny)).mean()
        grad = z.grad.norm() if z.grad is not None else torch.zeros((), dtype=dtype, device=z.device)
        rows.append(torch.stack([flat.square().mean(), c, grad]))
        if z.shape[1:] != shape:
            stage.append(len(set(stage)))
            shape = z.shape[1:]
        else:
            stage.append(stage[-1])
    q, c, grad = (list(column) for column in zip(*torch.stack(rows).tolist(), strict=True))
    return Profile(q, c, grad, stage)


def decay_rate(values: list[float], stages: list[int]) -> float | None:
    """The slope b of log(values) = a_stage + b l by least squares (one intercept per stage, so a jump at a pool or
    a wider layer is not taken for decay), over the points with a positive finite value; None with fewer than
    two such points in any stage."""
    rows = [(i, s, math.log(v)) for i, (v, s) in enumerate(zip(values, stages, strict=True)) if 0 < v < math.inf]
    kept = sorted({s for _, s, _ in rows})
    if not rows or max(sum(1 for _, s, _ in rows if s == k) for k in kept) < 2:
        return None
    design = np.zeros((len(rows), len(kept) + 1))
    for i, (layer, s, _) in enumerate(rows):
        design[i, kept.index(s)] = 1.0
        design[i, -1] = layer
    solution, *_ = np.linalg.lstsq(design, np.array([y for _, _, y in rows]), rcond=None)
    return float(solution[-1])


def predicted_depth(xi_c: float, xi_grad: float) -> float:
    """The deepest trainable depth the depth scales predict: 6 min(xi_c, xi_grad) (Schoenholz et al., 2017)."""
    return 6 * min(xi_c, xi_grad)


@dataclass(frozen=True)
class DepthScales:
    """The fitted depth scales (in layers; inf: no decay seen) and the trainable depth they predict."""

    xi_c: float
    xi_grad: float
    c_star: float

    @property
    def predicted_depth(self) -> float:
        return predicted_depth(self.xi_c, self.xi_grad)

    @property
    def binds(self) -> str:
        """The scale the prediction comes from: `xi_c`, `xi_grad`, `both` (equal) or `neither` (both inf)."""
        if math.isinf(self.xi_c) and math.isinf(self.xi_grad):
            return "neither"
        if self.xi_c == self.xi_grad:
            return "both"
        return "xi_c" if self.xi_c < self.xi_grad else "xi_grad"

    @property
    def binding(self) -> float:
        """min(xi_c, xi_grad): the prediction is six times it."""
        return min(self.xi_c, self.xi_grad)


def depth_scales(profile: Profile) -> DepthScales:
    """xi_c from |c^l - c*| ~ exp(-l / xi_c), c* the mean of the last quarter of the layers and the fit over the
    layers before them that are farther from c* than three standard deviations of that quarter; xi_grad from the
    squared gradient norm, |g^l|^2 ~ exp(-(L - l) / xi_grad) (growing or shrinking: either way the signal is
    lost)."""
    n = len(profile)
    tail = max(1, n // 4)
    c_star = float(np.mean(profile.c[n - tail :]))
    floor = max(3 * float(np.std(profile.c[n - tail :])), 1e-12)  # closer to c* than the tail's own spread: at it
    head = n - tail
    gaps = [abs(c - c_star) if abs(c - c_star) > floor else 0.0 for c in profile.c[:head]]
    rate_c = decay_rate(gaps, profile.stage[:head]) if head >= 2 else None
    xi_c = math.inf if rate_c is None or rate_c >= 0 else -1.0 / rate_c
    rate_g = decay_rate([g * g for g in profile.grad], profile.stage)
    xi_grad = math.inf if rate_g is None or rate_g == 0 else 1.0 / abs(rate_g)
    return DepthScales(xi_c, xi_grad, c_star)
