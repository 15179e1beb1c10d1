"""The flexible layer of the network-size study (research line 3): a linear layer with a learned size.

Unit i = 0..N-1 is scaled by f_i = 1 - sigmoid(k (i - x0)): units left of x0 are on, units right of
it off, with a grey zone about 10/k wide. x0 is trained; the penalty is the soft size

    S = integral_0^N f(t) dt = N - (softplus(k (N - x0)) - softplus(-k x0)) / k,

which stays in [0, N] (penalising x0 itself lets the loss run to minus infinity, as the original saw).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.layers.activations import activation as make_activation


def unit_scales(x0: torch.Tensor, k: torch.Tensor | float, n: int) -> torch.Tensor:
    """f_i = 1 - sigmoid(k (i - x0)) = sigmoid(k (x0 - i)) for i = 0..n-1 (the second form never cancels)."""
    i = torch.arange(n, device=x0.device, dtype=x0.dtype)
    return torch.sigmoid(k * (x0 - i))


def soft_size(x0: torch.Tensor, k: torch.Tensor | float, n: int) -> torch.Tensor:
    """The closed-form integral S in float64, clamped to [0, n]: finite values and gradients for
    |x0| up to 1e4 and k from 0.01 to 100 (softplus is linear far out, so nothing overflows)."""
    x0_64 = x0.double()
    k_64 = torch.as_tensor(k, dtype=torch.float64, device=x0.device)
    size = n - (F.softplus(k_64 * (n - x0_64)) - F.softplus(-k_64 * x0_64)) / k_64
    return size.clamp(0.0, float(n)).to(x0.dtype)


class FlexibleLinear(nn.Module):
    """Linear layer + activation whose outputs are scaled by f_i(x0, k); `x0` (the size) is a trained parameter."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        start_size: float,
        slope: float = 1.0,
        random_slope: bool = False,
        grey_zone: tuple[float, float] = (1.0, 20.0),
        activation: str = "relu",
    ):
        """
        Args:
            in_features: inputs.
            out_features: N, the most units the layer can use.
            start_size: the initial x0 (the starting size).
            slope: k, fixed (the original: 1); also used in evaluation when `random_slope`.
            random_slope: draw k per training batch, k = 10 / w with the grey-zone width w uniform in `grey_zone`.
            grey_zone: the range of w for `random_slope`.
            activation: applied before the scale (`relu`, `tanh`, `identity`); f_i > 0, so a unit's sign is kept.
        """
        super().__init__()
        if not 0 <= start_size <= out_features:
            raise ValueError(f"start_size must be in [0, {out_features}], got {start_size}")
        self.linear = nn.Linear(in_features, out_features)
        self.act = make_activation(activation)
        self.x0 = nn.Parameter(torch.tensor(float(start_size)))
        self.slope, self.random_slope, self.grey_zone = slope, random_slope, tuple(grey_zone)
        self.last_slope: torch.Tensor | float = float(slope)

    def current_slope(self) -> torch.Tensor | float:
        """k for this forward pass: drawn per training batch with `random_slope` (a tensor on the layer's device,
        so there is no host sync, and stacked seeds under `vmap` each draw their own), else `slope`."""
        if self.training and self.random_slope:
            low, high = self.grey_zone
            return 10.0 / (low + (high - low) * torch.rand((), device=self.x0.device))
        return float(self.slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_slope = self.current_slope()
        return self.act(self.linear(x)) * unit_scales(self.x0, self.last_slope, self.linear.out_features)

    def penalty(self) -> torch.Tensor:
        """The soft size S with the slope of the last forward pass (differentiable in x0)."""
        return soft_size(self.x0, self.last_slope, self.linear.out_features)

    def size(self) -> torch.Tensor:
        """The effective size: x0 within [0, N] (a tensor, so it also reads stacked seeds under `torch.func`)."""
        return self.x0.detach().clamp(0, self.linear.out_features)

    def extra_repr(self) -> str:
        return f"slope={self.slope}, random_slope={self.random_slope}, grey_zone={self.grey_zone}"
