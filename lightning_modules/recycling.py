"""ReDo during training (the Classifier's `recycle` setting): after every F optimizer steps, the dormant units of
the chosen layers get fresh incoming weights (spec 06, Sokar et al., 2023).

It changes the weights and the optimizer's state, so it is part of training, not a callback (callbacks here only
observe). The units' scores come from the training batches since the previous event (or the last
`score_batches` of them), hooked on each layer's activation on the device; at an event the sums are added over
the DDP ranks (one collective per event, none per step), and the fresh weights come from a generator seeded
alike on every rank, so every rank holds the same net afterwards. An event comes before the step it is logged at
(the step index Lightning and the callbacks log at), so every checkpoint lies between events: the scores gathered
since the last one are kept in it, and a resumed run recycles at the same steps with the same weights. Recycling
a dormant unit that is still alive moves the output; each event logs by how much. How a unit is recycled is
`layers/recycling.py`.
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lightning_modules.collectives import all_reduce_max, sum_over_ranks
from lightning_modules.errors import ConfigError, require
from lightning_modules.layers.recycling import UnitGroup, recycle
from lightning_modules.statistics.unit_health import dormant_scores, summed_abs_per_unit


@dataclass
class Recycling:
    """When and what to recycle."""

    every_n_steps: int = 1000  # F: an event after every F optimizer steps
    tau: float = 0.025  # a unit is recycled when its dormant score s_i <= tau
    names: tuple[str, ...] = ("*",)  # the layers (by the names the activation callbacks report), fnmatch
    score_batches: int | None = None  # score on the last this many training batches (None: all since the last event)


@contextlib.contextmanager
def evaluating(net: nn.Module) -> Iterator[None]:
    """The net in eval mode (no dropout, batch norm's running statistics), every module's own mode restored after."""
    modes = [(module, module.training) for module in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


class Recycler:
    """Scores the units of the chosen layers on training batches and recycles the dormant ones after every F steps."""

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
        self.settings, self.net, self.groups = settings, net, chosen
        # per layer, (sum over samples of each unit's |h|, samples) of each scoring batch; one running entry when
        # every batch since the last event scores
        self.batches: dict[str, collections.deque] = {
            name: collections.deque(maxlen=settings.score_batches) for name in chosen
        }
        self.previous: dict[str, torch.Tensor] = {}  # the units each layer recycled at the last event
        self.events: list[dict] = []  # every event: its step and the units each layer recycled
        self.last_event = 0
        self.handles: list = []

    def attach(self) -> None:
        """Hook the chosen layers' activations: every training batch adds to the units' scores."""
        self.remove()
        self.handles = [group.activation.register_forward_hook(self._hook(n)) for n, group in self.groups.items()]

    def _hook(self, name: str):
        def record(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if module.training and isinstance(output, torch.Tensor):  # training batches only, on the device
                window, sums = self.batches[name], summed_abs_per_unit(output.detach())
                if window.maxlen is None and window:
                    total, samples = window[0]
                    window[0] = (total + sums, samples + len(output))
                else:
                    window.append((sums, len(output)))

        return record

    def step(self, step: int, optimizer, inputs: torch.Tensor | None = None) -> dict[str, float]:
        """Before the optimizer step with index `step` (`step` steps taken), when `step` is a multiple of F and has
        had no event yet: recycle, and return per layer the units recycled and how many of the previous event's are
        dormant again, and (given a batch of `inputs`) the largest change of a logit on it in eval mode, over the
        ranks; otherwise nothing."""
        every = self.settings.every_n_steps
        if step == 0 or step % every or step == self.last_event:
            return {}
        self.last_event = step
        names = [name for name in self.groups if self.batches[name]]
        if not names:
            return {}
        local = [torch.stack([s for s, _ in self.batches[name]]).sum(0) for name in names]
        counts = torch.tensor([float(sum(n for _, n in self.batches[name])) for name in names])
        *sums, counts = sum_over_ranks([*local, counts.to(local[0].device)])  # each rank's samples, once
        before = self.logits(inputs)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        report: dict[str, float] = {}
        for i, name in enumerate(names):
            scores = dormant_scores(sums[i].double() / counts[i].clamp(min=1))
            units = torch.nonzero(scores <= self.settings.tau).flatten().cpu()
            generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + i)  # alike on every rank
            recycle(self.groups[name], units, generator, optimizer)
            report[f"recycle/{name}/recycled"] = float(len(units))
            if name in self.previous:
                again = torch.isin(self.previous[name], units).sum()
                report[f"recycle/{name}/dormant_again"] = float(again)
            self.previous[name] = units
            self.batches[name].clear()
        if before is not None:
            report["recycle/logit_change"] = float(all_reduce_max((self.logits(inputs) - before).abs().amax()))
        self.events.append({"step": step, "units": dict(self.previous)})
        return report

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor | None) -> torch.Tensor | None:
        """The net's output on `inputs` in eval mode (float32), or None without inputs."""
        if inputs is None:
            return None
        with evaluating(self.net):
            return self.net(inputs).float()

    def fresh(self, steps: int) -> dict[str, float]:
        """Per layer, the units recycled fewer than F steps before a check made after `steps` steps: alive by their
        fresh incoming weights before their outgoing ones (0 at the event) feed anything much."""
        young = bool(self.events) and steps - self.events[-1]["step"] < self.settings.every_n_steps
        counts = {name: len(self.events[-1]["units"].get(name, ())) if young else 0 for name in self.groups}
        return {**{f"recycle/{name}/fresh": float(n) for name, n in counts.items()},
                "recycle/total/fresh": float(sum(counts.values()))}  # fmt: skip

    def state_dict(self) -> dict:
        """The events so far (a resumed run reports `dormant_again` against the event before the interruption) and
        the scores gathered since the last event, summed over the ranks: under DDP a collective, which Lightning's
        on_save_checkpoint is on every rank."""
        names = list(self.groups)
        sums, samples = zip(*(self.entries(name) for name in names), strict=True)
        summed = sum_over_ranks([*sums, *samples])
        scores = {
            name: {"sums": summed[i].float().cpu(), "samples": summed[len(names) + i].long().cpu()}
            for i, name in enumerate(names)
        }
        return {"events": self.events, "last_event": self.last_event, "previous": self.previous, "scores": scores}

    def entries(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's scoring batches as (batches x units sums, samples per batch), on the layer's device."""
        device = self.groups[name].incoming.weight.device
        window = self.batches[name]
        if not window:
            units = self.groups[name].incoming.weight.shape[0]
            return torch.zeros(0, units, device=device), torch.zeros(0, device=device)
        sums = torch.stack([s for s, _ in window])
        return sums, torch.tensor([float(n) for _, n in window], device=device)

    def load_state_dict(self, state: dict, rank: int = 0) -> None:
        """Restore a checkpoint's events and scores: rank 0 holds the scores summed over the ranks, every other rank
        as many empty batches (a window of the last `score_batches` ages alike on every rank)."""
        self.events, self.last_event, self.previous = state["events"], state["last_event"], state["previous"]
        for name, saved in state.get("scores", {}).items():  # none in checkpoints written before they were kept
            if name not in self.groups:
                continue
            group: UnitGroup = self.groups[name]
            sums = saved["sums"].to(group.incoming.weight.device)
            if rank:
                sums = torch.zeros_like(sums)
            samples = saved["samples"].tolist() if not rank else [0] * len(saved["samples"])
            self.batches[name].clear()
            self.batches[name].extend(zip(sums, samples, strict=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
