"""Continual backprop (CBP; Dohare et al., 2024; spec 07): every step, each layer replaces a small fraction of its
mature units, the least useful by their contribution utility, with units drawn fresh from the net's own init.

Utility u_i <- eta * u_i + (1 - eta) * |h_i| * sum_k |w_ki| after every training forward pass, on the device (h_i
the unit's activation averaged over the batch and, for a conv channel, its positions; w_ki its outgoing weights);
age a_i counts the steps since the unit was last replaced. A layer of n units owes rho * n replacements a step (a
fractional count carried over); when it owes one or more, the mature units (a_i > m) with the least utility, as
many as it owes, get fresh incoming weights, bias 0 and zero outgoing weights, their optimizer state zeroed and
their utility and age set to 0 (`layers.recycling.recycle`, as ReDo's). Under DDP the utilities are averaged over
the ranks at each replacement (one collective then, none otherwise) and the fresh weights come from a generator
seeded by (seed, step, layer), so every rank keeps one net. Its utilities, ages and counts are in checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_modules.collectives import sum_over_ranks, world_size
from lightning_modules.errors import ConfigError, require
from lightning_modules.layers.recycling import UnitGroup, recycle


def outgoing_magnitude(group: UnitGroup) -> torch.Tensor:
    """sum_k |w_ki| per unit i: over every consumer's input columns (or blocks of columns after a flatten)."""
    total = None
    for consumer, block in group.outgoing:
        columns = consumer.weight.detach().abs()
        per_input = columns.sum(dim=tuple(d for d in range(columns.dim()) if d != 1))  # over outputs and taps
        per_unit = per_input.view(-1, block).sum(1)
        total = per_unit if total is None else total + per_unit
    if total is None:
        raise ConfigError(f"continual backprop {group.name}: the layer has no outgoing weights to weigh its units by")
    return total


class ContinualBackprop:
    """The CBP state of a net's recyclable layers: utility, age and owed replacements per layer."""

    def __init__(self, net: nn.Module, rate: float = 1e-4, maturity: int = 100, decay: float = 0.99, seed: int = 0):
        require("probability", rate=rate, decay=decay)
        require("non_negative", maturity=maturity)
        if not callable(getattr(net, "recyclable_units", None)):
            raise ConfigError(f"continual backprop: {type(net).__name__} has no recyclable units (recyclable_units())")
        self.groups: dict[str, UnitGroup] = {}
        for name, group in net.recyclable_units().items():
            if isinstance(group, str):
                raise ConfigError(f"continual backprop {name}: {group}")
            if group.activation is None or not group.outgoing:
                raise ConfigError(f"continual backprop {name}: needs the layer's activation and outgoing weights")
            self.groups[name] = group
        self.rate, self.maturity, self.decay, self.seed = rate, maturity, decay, seed
        self.utility: dict[str, torch.Tensor] = {}
        self.age: dict[str, torch.Tensor] = {}
        self.owed = {name: 0.0 for name in self.groups}
        self.handles: list = []
        self._saved: dict | None = None

    def attach(self) -> None:
        """Hook every layer's activation; utilities live on the layer's device."""
        self.remove()
        for name, group in self.groups.items():
            units, device = group.incoming.weight.shape[0], group.incoming.weight.device
            self.utility.setdefault(name, torch.zeros(units, device=device))
            self.age.setdefault(name, torch.zeros(units, dtype=torch.long, device=device))
            self.handles.append(group.activation.register_forward_hook(self._hook(name)))
        if self._saved is not None:
            self.load_state_dict(self._saved)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, name: str):
        def update(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if module.training and isinstance(output, torch.Tensor):
                h = output.detach().float()
                mean = h.mean(dim=(0, *range(2, h.dim())))  # over the batch and positions
                contribution = mean.abs() * outgoing_magnitude(self.groups[name]).to(mean)
                self.utility[name].mul_(self.decay).add_(contribution, alpha=1 - self.decay)

        return update

    @torch.no_grad()
    def step(self, step: int, optimizer) -> dict[str, float]:
        """After each optimizer step (`step` steps taken): ages grow, each layer's owed count grows by rho * n, and
        the layers that owe a whole unit replace their least useful mature units. Returns the units replaced."""
        owing = []
        for name in self.groups:
            self.age[name] += 1
            self.owed[name] += self.rate * len(self.age[name])
            if self.owed[name] >= 1:
                owing.append(name)
        if not owing:
            return {}
        utilities = [self.utility[name] for name in owing]
        if world_size() > 1:  # the ranks' mean: one choice for all
            utilities = [u / world_size() for u in sum_over_ranks(utilities)]
        report = {}
        for i, name in enumerate(owing):
            count = math.floor(self.owed[name])
            mature = torch.nonzero(self.age[name] > self.maturity).flatten()
            chosen = mature[utilities[i][mature].double().argsort(stable=True)[:count]]
            self.owed[name] -= count  # owed whether or not enough units are mature, as a rate over time
            if len(chosen):
                index = list(self.groups).index(name)
                generator = torch.Generator().manual_seed((self.seed << 40) + (step << 8) + index)
                recycle(self.groups[name], chosen.cpu(), generator, optimizer)
                self.utility[name][chosen] = 0
                self.age[name][chosen] = 0
            report[f"cbp/{name}/replaced"] = float(len(chosen))
        return report

    def state_dict(self) -> dict:
        return {
            "utility": {n: u.cpu() for n, u in self.utility.items()},
            "age": {n: a.cpu() for n, a in self.age.items()},
            "owed": dict(self.owed),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint's state (before `attach`: kept until the layers' devices are known)."""
        if not self.utility:
            self._saved = state
            return
        for name in self.groups:
            self.utility[name] = state["utility"][name].to(self.utility[name].device)
            self.age[name] = state["age"][name].to(self.age[name].device)
        self.owed = dict(state["owed"])
        self._saved = None
