"""The one-hidden-layer net of the network-size study (research line 3): 784 -> N -> 10.

The hidden layer is static (Linear + ReLU), flexible (a learned size x0) or a sparsifier (a learned
liveness per unit); all three have `linear` and `act` parts, so observers and the sweep read them alike.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from lightning_modules.errors import require
from lightning_modules.layers import FlexibleLinear, SparsifierLinear
from lightning_modules.layers.activations import activation as make_activation
from lightning_modules.layers.recycling import UnitGroup, chain_units, uniform_draw

LAYERS = ("static", "flexible", "sparsifier")


class MLP(nn.Module):
    """Flatten -> hidden layer of `width` units -> linear readout. `penalty()` and `sizes()` cover the sized layer."""

    def __init__(
        self,
        width: int = 256,
        layer: str = "static",
        in_features: int = 784,
        num_classes: int = 10,
        activation: str = "relu",
        start_size: float | None = None,
        slope: float = 1.0,
        random_slope: bool = False,
        threshold: float = 0.0,
    ):
        """
        Args:
            width: hidden units N (for a flexible layer the most it can use; a sparsifier's starting count).
            layer: `static`, `flexible` or `sparsifier`.
            in_features: inputs after flattening (784 for MNIST).
            num_classes: outputs.
            activation: the hidden activation (`relu`, `tanh`, `identity`).
            start_size: flexible only: the starting x0 (default: `width`, all units on).
            slope: flexible only: the slope k of the unit scales (the original: 1).
            random_slope: flexible only: a random slope per training batch (grey zone 1 to 20 units).
            threshold: sparsifier only: |liveness| at or below this counts as dead and is pruned.
        """
        require("positive", width=width, in_features=in_features, num_classes=num_classes, slope=slope)
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"unknown layer {layer!r}: one of {LAYERS}")
        if layer != "flexible" and (start_size is not None or random_slope):
            raise ValueError("start_size and random_slope belong to layer: flexible")
        self.args = dict(
            width=width,
            layer=layer,
            in_features=in_features,
            num_classes=num_classes,
            activation=activation,
            start_size=start_size,
            slope=slope,
            random_slope=random_slope,
            threshold=threshold,
        )
        self.layer, self.width = layer, width
        self.flatten = nn.Flatten()
        if layer == "flexible":
            start = width if start_size is None else start_size
            self.hidden = FlexibleLinear(in_features, width, start, slope, random_slope, activation=activation)
        elif layer == "sparsifier":
            self.hidden = SparsifierLinear(in_features, width, activation, threshold)
        else:
            self.hidden = nn.Sequential(
                OrderedDict(linear=nn.Linear(in_features, width), act=make_activation(activation))
            )
        self.out = nn.Linear(width, num_classes)

    def variant(self, **changes) -> MLP:
        """A freshly initialised MLP with these arguments changed (`width=512`, `layer="flexible"`, ...);
        a change of layer drops the flexible-only arguments it did not set."""
        unknown = set(changes) - set(self.args)
        if unknown:
            raise ValueError(f"MLP has no argument(s) {sorted(unknown)}: one of {sorted(self.args)}")
        args = {**self.args, **changes}
        if args["layer"] != "flexible":
            args.update({k: changes.get(k, default) for k, default in (("start_size", None), ("random_slope", False))})
        return MLP(**args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(self.flatten(x)))

    def hidden_activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden units' pre-activations and activations (before any learned scale), as the observers see them."""
        pre = self.hidden.linear(self.flatten(x))
        return pre, self.hidden.act(pre)

    def penalty(self) -> torch.Tensor:
        """The sized layer's penalty (soft size or L1 liveness); zero for a static net."""
        if self.layer == "static":
            return self.out.bias.new_zeros(())
        return self.hidden.penalty()

    def sizes(self) -> dict[str, torch.Tensor]:
        """The effective size per sized layer (`hidden`: x0 or live units); a static net's is its width."""
        if self.layer == "static":
            return {"hidden": torch.tensor(float(self.width))}
        return {"hidden": self.hidden.size().float()}

    def recyclable_units(self) -> dict[str, UnitGroup | str]:
        """The hidden layer's units for recycling (layers.recycling): a static layer's, with PyTorch's default init;
        a flexible or sparsifier layer learns its own size, which recycling would fight."""
        if self.layer != "static":
            return {"hidden": f"a {self.layer} layer learns its own size: recycling its units would fight its penalty"}
        leaves = [("hidden.linear", self.hidden.linear), ("hidden.act", self.hidden.act), ("out", self.out)]
        return chain_units(leaves, lambda m: uniform_draw(1 / math.sqrt(m.weight.shape[1])))

    @torch.no_grad()
    def prune(self, optimizer: torch.optim.Optimizer | None = None, keep: torch.Tensor | None = None) -> int:
        """Sparsifier only: remove the dead hidden units for real (see `SparsifierLinear.prune`); returns units left."""
        if self.layer != "sparsifier":
            raise TypeError(f"only a sparsifier layer can be pruned, this one is {self.layer}")
        kept = self.hidden.prune(self.out, optimizer, keep)
        self.width = len(kept)
        return self.width
