"""Interventions against loss of plasticity that act on the weights (spec 07): L2 towards the initial weights, shrink
and perturb, head reset and continual backprop; the Classifier's `plasticity` setting, off by default, with any
optimizer.

They change the weights (and, for a head reset, the optimizer's state), so they are part of training, not
callbacks. Fresh weights come from the net's own initialisation with a generator seeded by (seed, step), alike on
every DDP rank, so every rank keeps one net and a resumed run draws what the uninterrupted one drew. The initial
weights of L2 Init are buffers of the Classifier, so they are in its checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lightning_modules.continual_backprop import ContinualBackprop
from lightning_modules.errors import ConfigError, require


@dataclass
class Plasticity:
    """Which interventions, and how strong; the defaults change nothing."""

    l2_init: float = 0.0  # lambda of the loss term lambda * ||theta - theta_0||^2 (Kumar et al., 2023)
    shrink: float = 1.0  # lambda of theta <- lambda * theta + p * theta_fresh (Ash and Adams, 2020)
    perturb: float = 0.0  # p of the same
    shrink_perturb_every: Literal["task", "step"] = "task"  # at every task boundary, or after every step
    head_reset: bool = False  # the last linear layer re-drawn at every task boundary (Nikishin et al., 2022)
    cbp: bool = False  # continual backprop (Dohare et al., 2024): lightning_modules/continual_backprop.py
    cbp_rate: float = 1e-4  # rho: units replaced per unit and step
    cbp_maturity: int = 100  # m: a unit can be replaced once older than this many steps
    cbp_decay: float = 0.99  # eta: the utility's running-average decay
    seed: int = 0  # fresh weights come from (seed, step)

    @property
    def shrinks(self) -> bool:
        return self.shrink != 1.0 or self.perturb != 0.0


def head_of(net: nn.Module) -> tuple[str, nn.Linear]:
    """The net's read-out: its last nn.Linear."""
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"head_reset needs a net whose last layer is a Linear; {type(net).__name__} has none")
    return linears[-1]


def reinitialise(module: nn.Module, generator_seed: int) -> None:
    """`module` drawn again from its initialisation: every submodule's `reset_parameters`, then the module's own
    when it has one (a net with an init of its own, as DepthCNN's), from the global generator seeded alike on every
    rank; the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        for child in module.modules():
            if child is not module and hasattr(child, "reset_parameters"):
                child.reset_parameters()
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


@torch.no_grad()
def fresh_parameters(net: nn.Module, generator_seed: int) -> list[torch.Tensor]:
    """A fresh draw of `net`'s parameters from its initialisation (`reinitialise`), the net left as it was. Drawn in
    place and restored, not on a copy: the net may carry the hooks of callbacks, which cannot be copied."""
    kept = [t.detach().clone() for t in (*net.parameters(), *net.buffers())]
    reinitialise(net, generator_seed)
    fresh = [p.detach().clone() for p in net.parameters()]
    for tensor, old in zip((*net.parameters(), *net.buffers()), kept, strict=True):
        tensor.copy_(old)
    return fresh


def draw_seed(settings: Plasticity, step: int, what: int) -> int:
    """The seed of a fresh draw: (seed, step, what) in one integer, the same on every rank."""
    return (settings.seed << 40) + (step << 2) + what


class Interventions:
    """Applies a Plasticity setting to a net during training. `initial` holds theta_0 (L2 Init)."""

    def __init__(self, settings: Plasticity, net: nn.Module):
        require("non_negative", l2_init=settings.l2_init, perturb=settings.perturb, shrink=settings.shrink)
        if settings.shrink_perturb_every not in ("task", "step"):
            raise ConfigError(f"shrink_perturb_every must be 'task' or 'step', got {settings.shrink_perturb_every!r}")
        self.settings = settings
        if settings.head_reset:
            head_of(net)  # refused now, not at the first boundary
        self.cbp = (
            ContinualBackprop(net, settings.cbp_rate, settings.cbp_maturity, settings.cbp_decay, settings.seed)
            if settings.cbp
            else None
        )

    def attach(self) -> None:
        if self.cbp is not None:
            self.cbp.attach()

    def remove(self) -> None:
        if self.cbp is not None:
            self.cbp.remove()

    def state_dict(self) -> dict:
        return {"cbp": self.cbp.state_dict()} if self.cbp is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.cbp is not None and "cbp" in state:
            self.cbp.load_state_dict(state["cbp"])

    def initial_weights(self, net: nn.Module) -> nn.Module | None:
        """theta_0 as buffers of a module (kept in checkpoints), when L2 Init is on."""
        if not self.settings.l2_init:
            return None
        holder = nn.Module()
        for name, param in net.named_parameters():
            holder.register_buffer(name.replace(".", "__"), param.detach().clone())
        return holder

    def penalty(self, net: nn.Module, initial: nn.Module | None) -> torch.Tensor | float:
        """lambda * ||theta - theta_0||^2, whose gradient is 2 lambda (theta - theta_0)."""
        if initial is None:
            return 0.0
        total = sum(((p - getattr(initial, n.replace(".", "__"))) ** 2).sum() for n, p in net.named_parameters())
        return self.settings.l2_init * total

    def needs_tasks(self) -> bool:
        """Whether an intervention acts at task boundaries (so the data must be a task stream)."""
        s = self.settings
        return s.head_reset or (s.shrinks and s.shrink_perturb_every == "task")

    @torch.no_grad()
    def before_step(self, net: nn.Module, optimizer: torch.optim.Optimizer, step: int, task_boundary: bool) -> dict:
        """At the start of training step `step` (after step - 1): shrink and perturb and head reset where due.
        Returns what it did, for the loggers."""
        s, done = self.settings, {}
        if step > 0 and s.shrinks and (s.shrink_perturb_every == "step" or task_boundary):
            for param, new in zip(net.parameters(), fresh_parameters(net, draw_seed(s, step, 0)), strict=True):
                param.mul_(s.shrink).add_(new, alpha=s.perturb)
            done["plasticity/shrink_perturb"] = 1.0
        if step > 0 and s.head_reset and task_boundary:
            _, head = head_of(net)
            reinitialise(head, draw_seed(s, step, 1))
            for param in head.parameters():
                optimizer.state.pop(param, None)  # its momentum or moments belong to the weights just replaced
            done["plasticity/head_reset"] = 1.0
        if step > 0 and self.cbp is not None:
            done.update(self.cbp.step(step, optimizer))
        return done
