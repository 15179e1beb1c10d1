"""ReDo during training (the Classifier's `recycle` setting): every F optimizer steps, the dormant units of the
chosen layers get fresh incoming weights (spec 06, Sokar et al., 2023).

It changes the weights and the optimizer's state, so it is part of training, not a callback (callbacks here only
observe). The units' scores come from the training batches since the previous event (or the last
`score_batches` of them), hooked on each layer's activation on the device; at an event the sums are added over
the DDP ranks (one collective per event, none per step), and the fresh weights come from a generator seeded
alike on every rank, so every rank holds the same net afterwards. How a unit is recycled without changing the
net's output is `layers/recycling.py`.
"""

from __future__ import annotations

import collections
import fnmatch
import os
from dataclasses import dataclass

import torch
from torch import nn

from lightning_modules.collectives import sum_over_ranks
from lightning_modules.errors import ConfigError, require
from lightning_modules.layers.recycling import recycle
from lightning_modules.statistics.unit_health import dormant_scores, summed_abs_per_unit


@dataclass
class Recycling:
    """When and what to recycle."""

    every_n_steps: int = 1000  # F: an event every F optimizer steps
    tau: float = 0.025  # a unit is recycled when its dormant score s_i <= tau
    names: tuple[str, ...] = ("*",)  # the layers (by the names the activation callbacks report), fnmatch
    score_batches: int | None = None  # score on the last this many training batches (None: all since the last event)


class Recycler:
    """Scores the units of the chosen layers on training batches and recycles the dormant ones every F steps."""

    def __init__(self, settings: Recycling, net: nn.Module):
        require("positive", every_n_steps=settings.every_n_steps, score_batches=settings.score_batches)
        require("non_negative", tau=settings.tau)
        if not callable(getattr(net, "recyclable_units", None)):
            raise ConfigError(f"recycling: {type(net).__name__} has no recyclable units (no recyclable_units())")
        units = net.recyclable_units()
        chosen = {n: g for n, g in units.items() if any(fnmatch.fnmatchcase(n, p) for p in settings.names)}
        if not chosen:
            raise ConfigError(f"recycling: no layer of {sorted(units)} matches names {list(settings.names)}")
        for name, group in chosen.items():
            if isinstance(group, str):
                raise ConfigError(f"recycling {name}: {group}")
        self.settings, self.groups = settings, chosen
        self.batches: dict[str, collections.deque] = {
            name: collections.deque(maxlen=settings.score_batches) for name in chosen
        }
        self.previous: dict[str, torch.Tensor] = {}  # the units each layer recycled at the last event
        self.events: list[dict] = []  # every event: its step and the units each layer recycled
        self.last_event = 0
        self.handles = [group.activation.register_forward_hook(self._hook(name)) for name, group in chosen.items()]

    def _hook(self, name: str):
        def record(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if module.training and isinstance(output, torch.Tensor):  # training batches only, on the device
                self.batches[name].append((summed_abs_per_unit(output.detach()), len(output)))

        return record

    def step(self, global_step: int, optimizer) -> dict[str, float]:
        """At every F-th optimizer step (once, whatever the gradient accumulation): recycle, and return per layer the
        units recycled and how many of the previous event's are dormant again; otherwise nothing."""
        every = self.settings.every_n_steps
        if global_step == 0 or global_step % every or global_step == self.last_event:
            return {}
        self.last_event = global_step
        names = [name for name in self.groups if self.batches[name]]
        if not names:
            return {}
        local = [torch.stack([s for s, _ in self.batches[name]]).sum(0) for name in names]
        counts = torch.tensor([float(sum(n for _, n in self.batches[name])) for name in names])
        *sums, counts = sum_over_ranks([*local, counts.to(local[0].device)])  # each rank's samples, once
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        report: dict[str, float] = {}
        for i, name in enumerate(names):
            scores = dormant_scores(sums[i].double() / counts[i].clamp(min=1))
            units = torch.nonzero(scores <= self.settings.tau).flatten().cpu()
            generator = torch.Generator().manual_seed(seed * 1_000_003 + global_step * 101 + i)  # alike on every rank
            recycle(self.groups[name], units, generator, optimizer)
            report[f"recycle/{name}/recycled"] = float(len(units))
            if name in self.previous:
                again = torch.isin(self.previous[name], units).sum()
                report[f"recycle/{name}/dormant_again"] = float(again)
            self.previous[name] = units
            self.batches[name].clear()
        self.events.append({"step": global_step, "units": dict(self.previous)})
        return report

    def state_dict(self) -> dict:
        """The events so far (kept in checkpoints: a resumed run reports `dormant_again` against the event before
        the interruption). The scores gathered since the last event are not kept: after a resume the next event
        scores the batches since the resume."""
        return {"events": self.events, "last_event": self.last_event, "previous": self.previous}

    def load_state_dict(self, state: dict) -> None:
        self.events, self.last_event, self.previous = state["events"], state["last_event"], state["previous"]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
