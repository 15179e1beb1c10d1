"""The sparsifier layer of the network-size study (research line 3): per-unit liveness, pruned for real.

Output act(Wx + b) * max(l, 0) with a liveness l_i per unit (init 1) and the L1 penalty
sum max(l_i, 0). A liveness that crosses zero switches its unit off exactly, and no gradient
reaches it there (neither from the task nor from the penalty), so a unit that reaches zero stays
dead, as in the spec; a plain |l| gate would only oscillate around zero under Adam, never reaching
it. `prune` removes dead units (liveness at or below the threshold), cutting their weight row, bias,
liveness and the next layer's input column into new, smaller tensors (and the optimizer's state
with them), so the shrunk model is smaller and faster, not only masked.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.layers.activations import activation as make_activation


class SparsifierLinear(nn.Module):
    """Linear + activation, each unit scaled by its own trained liveness (clamped at zero)."""

    def __init__(self, in_features: int, out_features: int, activation: str = "relu", threshold: float = 0.0):
        """
        Args:
            in_features: inputs.
            out_features: units at the start.
            activation: applied before the liveness scale (`relu`, `tanh`, `identity`).
            threshold: a unit with liveness at or below this is dead and pruned (0: exactly off units only).
        """
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.act = make_activation(activation)
        self.liveness = nn.Parameter(torch.ones(out_features))
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x)) * self.liveness.clamp(min=0)

    def penalty(self) -> torch.Tensor:
        """The L1 penalty sum max(l_i, 0) of the gates."""
        return self.liveness.clamp(min=0).sum(-1)

    def alive(self) -> torch.Tensor:
        """Mask of the units whose liveness is above the threshold."""
        return self.liveness.detach() > self.threshold

    def size(self) -> torch.Tensor:
        """Live units (a tensor, so it also reads stacked seeds under `torch.func`)."""
        return self.alive().sum(-1)

    @torch.no_grad()
    def prune(
        self,
        next_layer: nn.Linear,
        optimizer: torch.optim.Optimizer | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Remove the dead units from this layer and their input columns from `next_layer`; returns the
        indices kept. Parameters are replaced by smaller ones; the optimizer's groups and per-parameter
        state (momentum, Adam moments) are cut to match. `keep` overrides which units stay (to shrink
        a fresh layer to a pruned checkpoint's size before loading it)."""
        if keep is None:
            keep = self.alive().nonzero().flatten()
        cuts = [
            (self.linear, "weight", 0),
            (self.linear, "bias", 0),
            (self, "liveness", 0),
            (next_layer, "weight", 1),
        ]
        for module, name, dim in cuts:
            old = getattr(module, name)
            new = nn.Parameter(old.index_select(dim, keep).clone(), requires_grad=old.requires_grad)
            if optimizer is not None:
                _replace_in_optimizer(optimizer, old, new, keep, dim)
            setattr(module, name, new)
        self.linear.out_features = next_layer.in_features = len(keep)
        return keep

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


def _replace_in_optimizer(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, keep, dim) -> None:
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is not None:
        optimizer.state[new] = {
            key: value.index_select(dim, keep).clone()
            if isinstance(value, torch.Tensor) and value.shape == old.shape
            else value
            for key, value in state.items()
        }
