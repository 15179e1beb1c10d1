"""Fixed sparse weights (research line 5): a random, fixed set of each output unit's input weights is zero.

Each output unit keeps exactly round((1 - sparsity) * fan_in) input weights (conv: fan_in =
C_in * kh * kw), chosen without replacement from a seeded generator; the mask is a buffer, so
it travels with the checkpoint. The kept weights are rescaled to the kept fan-in at init, and
the masked ones are set to zero again after every optimizer step (`RezeroAfterStep`, which the
framework's LightningModules register on their optimizers; the bias is never masked).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sparse_mask(out_units: int, fan_in: int, keep: int, generator: torch.Generator) -> torch.Tensor:
    """(out_units, fan_in) bool mask with exactly `keep` True per row, the positions drawn without replacement."""
    order = torch.rand(out_units, fan_in, generator=generator, device="cpu").argsort(dim=1)
    return torch.zeros(out_units, fan_in, dtype=torch.bool, device="cpu").scatter_(1, order[:, :keep], True)


class SparseWeights(nn.Module):
    """Wraps a Linear or Conv2d so that a fixed fraction `sparsity` of each unit's input weights is zero."""

    def __init__(self, module: nn.Linear | nn.Conv2d, sparsity: float, seed: int | None = None):
        """
        Args:
            module: the Linear or Conv2d whose weights are made sparse.
            sparsity: fraction of each output unit's input weights that are zero (the spec's 60% and 90%;
                the study's printouts used weight_sparsity = 1 - this).
            seed: seed of the mask; by default drawn from torch's global generator (set by seed_everything).
        """
        super().__init__()
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"SparseWeights wraps a Linear or Conv2d, got {type(module).__name__}")
        fan_in = module.weight[0].numel()
        keep = round((1.0 - sparsity) * fan_in)
        if not 0.0 <= sparsity < 1.0 or keep < 1:
            raise ValueError(f"sparsity must be in [0, 1) and keep at least one weight per unit, got {sparsity}")
        self.module, self.sparsity, self.seed = module, sparsity, seed
        self.fan_in, self.keep = fan_in, keep
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), device="cpu").item())
        mask = sparse_mask(module.weight.shape[0], fan_in, keep, torch.Generator().manual_seed(seed))
        self.register_buffer("weight_mask", mask.view_as(module.weight).to(module.weight.device))
        with torch.no_grad():
            module.weight.mul_(math.sqrt(fan_in / keep))  # the init's variance at the kept fan-in
        self.rezero_weights()

    @torch.no_grad()
    def rezero_weights(self) -> None:
        """Set the masked weights to exactly zero (after an optimizer step moved them)."""
        self.module.weight.masked_fill_(~self.weight_mask, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def extra_repr(self) -> str:
        seed = "global generator" if self.seed is None else self.seed
        return f"sparsity={self.sparsity}, nonzero_per_unit={self.keep}/{self.fan_in}, seed={seed}"


def rezero_weights(net: nn.Module) -> None:
    """Re-zero the masked weights of every SparseWeights in `net`."""
    for module in net.modules():
        if isinstance(module, SparseWeights):
            module.rezero_weights()


class RezeroAfterStep:
    """An optimizer step post-hook that re-zeroes a net's masked weights after every step, however it is
    taken (plain, under DDP, with a mixed-precision grad scaler, after gradient accumulation)."""

    def __init__(self, net: nn.Module):
        self.net = net

    def __call__(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        rezero_weights(self.net)

    @staticmethod
    def attach(optimizer: torch.optim.Optimizer, net: nn.Module) -> None:
        """Register the hook on `optimizer` when `net` has sparse weights."""
        if any(isinstance(m, SparseWeights) for m in net.modules()):
            optimizer.register_step_post_hook(RezeroAfterStep(net))
