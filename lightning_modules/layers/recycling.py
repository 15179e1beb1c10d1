"""Recycling dormant units (ReDo; Sokar et al., 2023; spec 06), in plain torch: what a unit is made of, and how it
is given fresh incoming weights while it stops feeding the rest of the net.

A net that can recycle its units says so with `recyclable_units()`: a `UnitGroup` per layer of units (or, for a
layer that cannot be recycled, the reason). A unit's incoming weights (a Linear's row, a Conv's output channel)
are drawn again from the net's own initialisation and its bias set to 0; a batch norm after it goes back to
weight 1 and bias 0 with running statistics 0 and 1; its outgoing weights (the consumer's input column, input
channel, or the block of columns a channel becomes after a flatten) are set to 0. That leaves the output as it
was for a unit that was exactly dead (zero on every input); a dormant unit that was still alive loses what it fed
its consumer, and the output moves by that (the Recycler measures it at every event). A unit of a residual branch
has no outgoing weights (it is added into the stream): it is silenced at its batch norm instead (weight and bias
0), which needs a batch norm, and an activation that passes gradient at 0 to train again. The optimizer state of
every entry changed is set to zero (Adam's moments, SGD's momentum), or the old moments would push the fresh
weights back; Adam's step count, one per tensor, is kept (docs/training-dynamics.md says what that does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

Draw = Callable[[torch.Size, torch.Generator], torch.Tensor]  # (shape, generator) -> fresh weights, on the CPU


@dataclass
class UnitGroup:
    """The units of one layer, as recycling needs them."""

    name: str
    incoming: nn.Conv2d | nn.Linear  # unit i is its output channel (row) i
    draw: Draw  # fresh incoming weights from the net's own initialisation
    activation: nn.Module | None = None  # whose outputs give the units' dormant scores
    norm: nn.Module | None = None  # the batch norm right after `incoming`, if any
    outgoing: list[tuple[nn.Conv2d | nn.Linear, int]] = field(default_factory=list)  # consumer, its inputs per unit
    silence_by_norm: bool = False  # a residual branch: zero the norm's affine instead of outgoing weights


def normal_draw(std: float) -> Draw:
    """N(0, std^2) weights (the depth nets' init, or He normal with std = sqrt(2 / fan))."""

    def draw(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    return draw


def uniform_draw(bound: float) -> Draw:
    """U(-bound, bound) weights (PyTorch's default Linear and Conv init: bound = 1 / sqrt(fan_in))."""

    def draw(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound

    return draw


def chain_units(
    layers: list[tuple[str, nn.Module]], draw_for: Callable[[nn.Module], Draw]
) -> dict[str, UnitGroup | str]:
    """The unit groups of a chain of layers in forward order (a Sequential's leaves): each Conv2d or Linear with the
    batch norm and activation after it, consumed by the next Conv2d or Linear (the last one is the output and has
    no units to recycle). Pools and dropout keep a channel a channel; a Linear after a Conv takes a block of
    in_features / channels columns per channel (the flatten). A layer whose consumer does not take its units so
    gets the reason instead of a group."""
    groups: dict[str, UnitGroup | str] = {}
    current: UnitGroup | None = None
    for name, module in layers:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if current is not None and current.activation is not None:
                block = outgoing_block(current.name, current.incoming, block_name(name), module)
                if isinstance(block, int):
                    current.outgoing.append((module, block))
                groups[current.name] = current if isinstance(block, int) else block
            current = UnitGroup(block_name(name), module, draw_for(module))
        elif (
            current is not None and isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and current.activation is None
        ):
            current.norm = module
        elif current is not None and current.activation is None and is_activation(module):
            current.activation = module
    return groups


def outgoing_block(producer: str, incoming: nn.Module, consumer: str, module: nn.Conv2d | nn.Linear) -> int | str:
    """How many of `module`'s inputs each unit of `incoming` feeds (its block of columns), or why that is unknown: a
    conv's input channel is one unit, a Linear after a Linear takes one column per unit, a Linear after a conv a
    whole block of columns per channel (the flatten)."""
    units = incoming.weight.shape[0]
    if isinstance(module, nn.Conv2d):
        if module.in_channels == units and module.groups == 1:
            return 1
        return (
            f"{consumer} takes {module.in_channels} input channels in {module.groups} groups, not one per channel of "
            f"{producer} ({units})"
        )
    if isinstance(incoming, nn.Linear) and module.in_features != units:
        return f"{consumer} takes {module.in_features} inputs, not one per unit of {producer} ({units} units)"
    if module.in_features % units:
        return (
            f"{consumer} takes {module.in_features} inputs, not a whole block per channel of {producer} "
            f"({units} channels)"
        )
    return module.in_features // units


def passes_gradient_at_zero(activation: nn.Module) -> bool:
    """Whether the activation's slope at 0 is non-zero: a unit silenced to 0 at its batch norm then trains again
    (tanh, ELU), where a ReLU's gradient there is 0 for good."""
    zero = torch.zeros(1, requires_grad=True)
    with torch.enable_grad():
        (slope,) = torch.autograd.grad(activation(zero.clone()).sum(), zero)
    return bool(slope.abs().item() > 0)


def block_name(path: str) -> str:
    """A layer's name as the activation callbacks report it: a block's `conv`/`linear` part goes by its block."""
    head, _, last = path.rpartition(".")
    return head if head and last in ("conv", "linear", "act", "norm") else path


def is_activation(module: nn.Module) -> bool:
    return isinstance(module, (nn.ReLU, nn.ELU, nn.Tanh, nn.LeakyReLU, nn.GELU, nn.SiLU))


@torch.no_grad()
def recycle(group: UnitGroup, units: torch.Tensor, generator: torch.Generator, optimizer=None) -> None:
    """Give `units` (indices) of `group` fresh incoming weights, zero bias, a reset batch norm, and zero outgoing
    weights (or a silenced norm, for a residual branch); then zero the optimizer state of every entry changed
    (Adam's step count, one per tensor, stays)."""
    if len(units) == 0:
        return
    weight = group.incoming.weight
    units = units.to(weight.device)
    changed: list[tuple[torch.Tensor, tuple]] = []
    fresh = group.draw(torch.Size((len(units), *weight.shape[1:])), generator)
    weight[units] = fresh.to(weight.device, weight.dtype)
    changed.append((weight, (units,)))
    if group.incoming.bias is not None:
        group.incoming.bias[units] = 0
        changed.append((group.incoming.bias, (units,)))
    if group.norm is not None:
        scale = 0.0 if group.silence_by_norm else 1.0
        if group.norm.weight is not None:
            group.norm.weight[units] = scale
            group.norm.bias[units] = 0
            changed += [(group.norm.weight, (units,)), (group.norm.bias, (units,))]
        group.norm.running_mean[units] = 0
        group.norm.running_var[units] = 1
    for consumer, block in group.outgoing:
        columns = (units[:, None] * block + torch.arange(block, device=units.device)).flatten()
        consumer.weight[:, columns] = 0
        changed.append((consumer.weight, (slice(None), columns)))
    if optimizer is not None:
        for param, index in changed:
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value[index] = 0
