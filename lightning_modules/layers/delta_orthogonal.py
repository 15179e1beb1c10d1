"""Delta-orthogonal initialisation of a conv (Xiao et al., 2018; spec 06): the kernel is zero but at its centre
tap, which holds an orthogonal C_out x C_in matrix times a gain, so that at initialisation every layer maps each
position's channels by an isometry (up to the gain) and a deep tanh CNN at criticality keeps its signal and its
gradient over thousands of layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def delta_orthogonal_(
    weight: torch.Tensor, gain: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Fill a conv weight (C_out, C_in, k, k) in place: zero, and at the centre tap gain * sqrt(max(C_out / C_in, 1))
    times a matrix with orthonormal columns (C_out >= C_in) or rows (C_out < C_in). The square root keeps the
    mean square per output channel (q) through a layer that widens, as mean-field theory's sigma_w^2 = gain^2
    assumes. Backward, the transpose keeps C_in / C_out of a gradient's square (a projection) times the same
    C_out / C_in: the gradient's total square is kept, so its mean square per channel grows by C_out / C_in (doubles
    from 4 to 8 channels)."""
    if weight.dim() != 4 or weight.shape[2] % 2 == 0 or weight.shape[3] % 2 == 0:
        raise ValueError(f"delta-orthogonal needs a conv weight with an odd kernel, got shape {tuple(weight.shape)}")
    c_out, c_in, k_h, k_w = weight.shape
    gaussian = torch.randn(max(c_out, c_in), min(c_out, c_in), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed, not biased by QR's sign convention
    centre = q if c_out >= c_in else q.T
    weight.zero_()
    weight[:, :, k_h // 2, k_w // 2] = (gain * math.sqrt(max(c_out / c_in, 1.0)) * centre).to(weight.dtype)
    return weight


def delta_orthogonal_conv(conv: nn.Conv2d, gain: float, bias_std: float) -> None:
    """A conv's delta-orthogonal weight and N(0, bias_std^2) bias (0 when bias_std is 0)."""
    delta_orthogonal_(conv.weight, gain)
    init_bias(conv, bias_std)


def init_bias(conv: nn.Conv2d, bias_std: float) -> None:
    """N(0, bias_std^2) biases; zeros at 0, drawing nothing (a net without bias noise draws what it always drew)."""
    if conv.bias is not None:
        nn.init.normal_(conv.bias, 0.0, bias_std) if bias_std else nn.init.zeros_(conv.bias)
