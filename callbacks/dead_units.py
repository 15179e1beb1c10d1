"""Dead units: units that pass no gradient on any input of a whole split (research line 2).

A ReLU unit is dead when it is off (<= threshold, 0) at every position of every sample, a tanh or ELU unit when
it is saturated (slope |phi'(z)| <= blocking_eps) at every one, a k-winners unit when it never wins. A conv unit
is an output channel, a linear unit an output neuron. The state is O(units): each unit's running maximum and, for
the saturating and k-winners layers, whether any entry passed gradient; one reduction per batch on the device, and
an exact maximum over ranks once per epoch.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from callbacks.activation_observer import (
    ActivationObserver,
    agreed_sizes,
    layer_name,
    log_now,
    logged_step,
    network_of,
    wandb_loggers,
)
from callbacks.figures import BackgroundFigures, dead_units_figure, dormant_share_figure
from lightning_modules.collectives import all_reduce_max, all_reduce_sum
from lightning_modules.errors import require
from lightning_modules.layers.kwinners import KWinnersBase
from lightning_modules.run.console import say
from lightning_modules.run.files import atomic_save
from lightning_modules.run.run_folder import run_folder
from lightning_modules.statistics.unit_health import (
    blocked_entries,
    dead_rule,
    dormant_scores,
    dormant_share,
    duty_cycle_entropy,
    passing_units,
    summed_abs_per_unit,
)


def consumer_keyed(
    net: nn.Module, layers: dict[str, nn.Module], counts: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    """The original study's format: per consuming conv/linear layer (`conv2_1/0`; the last one `logit`),
    (dead units among its inputs, units); the first layer's inputs are the image channels, never dead."""
    monitored = {id(module): name for name, module in layers.items() if name in counts}
    order = []  # ("weight", name, inputs) and ("monitored", name), in module order
    for qualified, module in net.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            order.append(("weight", layer_name(qualified), module.in_channels))
        elif isinstance(module, nn.Linear):
            order.append(("weight", layer_name(qualified), module.in_features))
        elif id(module) in monitored:
            order.append(("monitored", monitored[id(module)], None))
    weights = [entry for entry in order if entry[0] == "weight"]

    def key(weight: tuple | None) -> str:
        if weight is None:
            return "output"
        return weight[1] if weight is weights[-1] else f"{weight[1]}/0"

    result: dict[str, tuple[int, int]] = {}
    if weights:
        result[key(weights[0])] = (0, weights[0][2])
    for i, (kind, name, _) in enumerate(order):
        if kind == "monitored":
            consumer = next((entry for entry in order[i + 1 :] if entry[0] == "weight"), None)
            result[key(consumer)] = counts[name]
    return result


class DeadUnits(ActivationObserver):
    """The health of units per monitored layer at every validation epoch: dead counts (`dead/<layer>`,
    `dead/total`: units that pass no gradient on any input), tau-dormant shares (`dormant/tau<t>/<layer>`), the
    gradient-blocking share of tanh, ELU and ReLU layers (`blocking/<layer>`), k-winners' duty-cycle entropy
    (`duty_entropy/<layer>` beside `duty_entropy_max/<layer>`), and the units that died and revived since the
    previous check (`health/<layer>/died`, `.../revived`, at `health_tau`).

    Also: a W&B table and a per-layer bar chart (`dead_units.png` in the run folder), a printed table,
    optionally the original study's consumer-keyed dict, each unit's peak activation over the split
    (`dead_units/step<N>.pt`, per layer; how far from dead a unit is), the unit-health record
    (`unit_health.pt`: per layer, the steps checked, every unit's dormant score and whether it was dormant at
    each), and `dormant_share.png` (the dormant share against step, per layer, also on W&B); all loadable with
    weights_only=True.
    """

    def __init__(
        self,
        threshold: float = 0.0,
        consumer_keys: bool = False,
        dormant_taus: tuple[float, ...] = (0.0, 0.025, 0.1),
        health_tau: float = 0.025,
        blocking_eps: float = 0.05,
        **kwargs,
    ):
        """
        Args:
            threshold: a ReLU unit (or one of any module but tanh, ELU and k-winners) is dead when its activation is
                <= this for every sample (and position).
            consumer_keys: also print the original's format: per consuming layer, (dead inputs, inputs).
            dormant_taus: report the share of units whose dormant score s_i = E|h_i| / (layer mean of E|h|) is
                at or below each of these (Sokar et al., 2023; 0 is the dead share of a ReLU layer).
            health_tau: the tau at which the unit-health record says which units are dormant, and counts the
                units that died (became dormant) and revived since the previous check.
            blocking_eps: the slope |phi'(z)| at or below which an entry blocks the gradient (spec 06): the share of
                such entries is reported for tanh, ELU and ReLU layers, and a tanh or ELU unit blocked on every
                entry is dead.
            **kwargs: which layers, over which data, how often: see `ActivationObserver`.
        """
        require("non_negative", health_tau=health_tau, blocking_eps=blocking_eps,
                **{f"dormant_taus[{i}]": t for i, t in enumerate(dormant_taus)})  # fmt: skip
        super().__init__(**kwargs)
        self.threshold, self.consumer_keys = threshold, consumer_keys
        self.dormant_taus, self.health_tau, self.blocking_eps = tuple(dormant_taus), health_tau, blocking_eps
        self.maxima: dict[str, torch.Tensor] = {}
        self.passing: dict[str, torch.Tensor] = {}  # tanh, ELU, k-winners: per unit, whether any entry passed gradient
        self.sums: dict[str, torch.Tensor] = {}  # per layer: per-unit sum of |h| (a sample's mean over positions)
        self.samples: dict[str, int] = {}
        self.blocked: dict[str, torch.Tensor] = {}  # per layer: entries whose slope blocks the gradient (device)
        self.entries: dict[str, int] = {}  # per layer: entries counted for blocking
        self.counts: dict[str, tuple[int, int]] = {}
        self.dead: dict[str, torch.Tensor] = {}  # per unit, of the last observation
        self.peaks: dict[str, torch.Tensor] = {}  # per unit, of the last observation
        self.scores: dict[str, torch.Tensor] = {}  # per unit dormant score, of the last observation
        self.health: dict[str, dict[str, list]] = {}  # per layer: the steps checked, scores and dormant masks
        self.figures = BackgroundFigures()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(split=self.split, names=self.names)

    def state_dict(self) -> dict:
        """The unit-health record, so a resumed run counts died and revived units against the check before the
        interruption and its `unit_health.pt` keeps every check."""
        return {"health": self.health}

    def load_state_dict(self, state_dict: dict) -> None:
        self.health = state_dict.get("health", {})

    def start(self) -> None:
        self.maxima, self.passing, self.sums, self.samples, self.blocked, self.entries = {}, {}, {}, {}, {}, {}

    def observe(self, name: str, output: torch.Tensor) -> None:
        summed = summed_abs_per_unit(output)  # per unit, before `output` is reduced to its maxima
        self.sums[name] = self.sums[name] + summed if name in self.sums else summed
        self.samples[name] = self.samples.get(name, 0) + len(output)
        module = self.layers[name]
        blocked = blocked_entries(module, output, self.blocking_eps)
        if blocked is not None:  # entries counted on the device, their number on the host: no sync
            count = torch.count_nonzero(blocked)  # twice as fast as a mask's sum on a CPU
            self.blocked[name] = self.blocked[name] + count if name in self.blocked else count
            self.entries[name] = self.entries.get(name, 0) + output.numel()
        passing = passing_units(module, output, blocked)
        if passing is not None:
            self.passing[name] = self.passing[name] | passing if name in self.passing else passing
        if output.dim() > 2:  # positions first, then samples: twice as fast as one amax on channels_last maps
            output = output.amax(dim=tuple(range(2, output.dim())))
        batch_max = output.amax(dim=0).float() if output.dim() > 1 else output.float()
        previous = self.maxima.get(name)
        self.maxima[name] = batch_max if previous is None else torch.maximum(previous, batch_max)

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seen = {name: (len(self.maxima[name]) if name in self.maxima else 0,) for name in self.layers}
        units = {name: size for name, (size,) in agreed_sizes(seen, pl_module.device).items()}
        names = [name for name in self.layers if units[name]]  # the same on every rank, whatever each one saw
        if not names:
            return
        sizes = [units[name] for name in names]
        self.fill_unobserved(names, sizes, pl_module.device)
        slopes = [name for name in names if dead_rule(self.layers[name]) != "off"]  # read from `passing`
        packed = torch.cat([*(self.maxima[name] for name in names), *(self.passing[name].float() for name in slopes)])
        packed = all_reduce_max(packed).cpu()  # one collective, all layers
        maxima, passing = packed[: sum(sizes)], packed[sum(sizes) :].bool()
        self.peaks = {name: peak.clone() for name, peak in zip(names, maxima.split(sizes), strict=True)}
        passing = dict(zip(slopes, passing.split([units[name] for name in slopes]), strict=True))
        self.dead = {name: ~passing[name] if name in passing else self.peaks[name] <= self.threshold for name in names}
        self.measure_health(trainer, pl_module, names, sizes)
        dead = [int(self.dead[name].sum()) for name in names]
        self.counts = {name: (d, t) for name, d, t in zip(names, dead, sizes, strict=True)}
        total_dead, total = sum(dead), sum(sizes)
        scalars = {f"dead/{name}": float(d) for name, (d, _) in self.counts.items()}
        scalars.update({"dead/total": float(total_dead), "dead/fraction": total_dead / total})
        pl_module.log_dict(scalars, sync_dist=True, reduce_fx="max")  # already the same on every rank
        folder = run_folder(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if trainer.is_global_zero:
            self.report(trainer, pl_module, folder, total_dead, total)

    def fill_unobserved(self, names: list[str], sizes: list[int], device: torch.device) -> None:
        """What a rank that saw no sample of a layer contributes to each reduction (a maximum of -inf, no unit passing
        gradient, sums and counts of 0), so that every rank enters every collective with the same shapes."""
        for name, size in zip(names, sizes, strict=True):
            if name not in self.maxima:
                self.maxima[name] = torch.full((size,), -math.inf, device=device)
                self.sums[name], self.samples[name] = torch.zeros(size, device=device), 0
                if dead_rule(self.layers[name]) != "off":
                    self.passing[name] = torch.zeros(size, dtype=torch.bool, device=device)

    def measure_health(self, trainer: pl.Trainer, pl_module: pl.LightningModule, names: list[str], sizes: list[int]):
        """Dormant scores and shares, blocking shares, duty-cycle entropies and the died/revived counts of this
        observation, in `self.health_scalars`; the per-unit sums are summed over ranks in one collective, so every
        rank holds the same values (each sample counted once, as the dead counts are)."""
        device = self.sums[names[0]].device
        blocked = [
            torch.stack([self.blocked[name].float(), torch.tensor(float(self.entries[name]), device=device)])
            if name in self.blocked else torch.zeros(2, device=device)
            for name in names
        ]  # fmt: skip
        counts = torch.tensor([float(self.samples[name]) for name in names], device=device)
        packed = all_reduce_sum(torch.cat([*(self.sums[name].float() for name in names), counts, *blocked]))
        sums, rest = packed[: sum(sizes)].cpu().split(sizes), packed[sum(sizes) :].cpu()
        samples, blocked = rest[: len(names)], rest[len(names) :].view(-1, 2)
        scalars: dict[str, float] = {}
        everyone = []
        for i, name in enumerate(names):
            scores = dormant_scores(sums[i].double() / samples[i].clamp(min=1))
            self.scores[name] = scores
            everyone.append(scores)
            for tau in self.dormant_taus:
                scalars[f"dormant/tau{tau:g}/{name}"] = dormant_share(scores, tau)
            if blocked[i, 1] > 0:
                scalars[f"blocking/{name}"] = float(blocked[i, 0] / blocked[i, 1])
            module = self.layers[name]
            if isinstance(module, KWinnersBase):
                scalars[f"duty_entropy/{name}"], scalars[f"duty_entropy_max/{name}"] = duty_cycle_entropy(
                    module.duty_cycle, module.percent_on
                )
            record = self.health.setdefault(name, {"steps": [], "scores": [], "dormant": []})
            dormant = scores <= self.health_tau
            if record["dormant"]:
                before = record["dormant"][-1]
                scalars[f"health/{name}/died"] = float((dormant & ~before).sum())
                scalars[f"health/{name}/revived"] = float((~dormant & before).sum())
            record["steps"].append(logged_step(trainer))  # the x-axis the dashboard plots this check at
            record["scores"].append(scores.float())
            record["dormant"].append(dormant)
        for tau in self.dormant_taus:  # the share of all monitored units (each layer's own scores)
            scalars[f"dormant/tau{tau:g}/total"] = dormant_share(torch.cat(everyone), tau)
        self.health_scalars = scalars

    def dead_when(self, name: str) -> str:
        """What makes a unit of this layer dead, for the printed table."""
        rule = dead_rule(self.layers[name])
        if rule == "saturated":
            return f"saturated: |phi'| <= {self.blocking_eps:g} everywhere"
        return "never wins" if rule == "never wins" else f"off: never > {self.threshold:g}"

    def report(self, trainer, pl_module, folder: Path | None, total_dead: int, total: int) -> None:
        title = f"dead units ({self.split}, epoch {trainer.current_epoch}, step {logged_step(trainer)})"
        if self.print_table:
            width = max(len(name) for name in self.counts) + 2
            rules = {name: self.dead_when(name) for name in self.counts}
            shared = set(rules.values()).pop() if len(set(rules.values())) == 1 else None  # said once, in the title
            lines = [f"{title}: units that pass no gradient on any input" + (f" ({shared})" if shared else "")]
            lines += [f"  {name:<{width}}{d:>6} / {t:<6}" + ("" if shared else f"  {rules[name]}")
                      for name, (d, t) in self.counts.items()]  # fmt: skip
            lines.append(f"  {'total':<{width}}{total_dead:>6} / {total:<6} ({total_dead / total:.1%})")
            if self.consumer_keys:
                keyed = consumer_keyed(network_of(pl_module), self.layers, self.counts)
                lines.append("{" + ",\n ".join(f"{k!r}: ({d}, {t})" for k, (d, t) in keyed.items()) + "}")
            say("\n".join(lines))
        rows = [(name, d, t) for name, (d, t) in self.counts.items()]
        log_now(trainer, self.health_scalars)  # to any logger, also one without a folder (a study's trial)
        if folder is None:
            return
        atomic_save(self.peaks, folder / "dead_units" / f"step{logged_step(trainer):07d}.pt")
        loggers, step = wandb_loggers(trainer), logged_step(trainer)
        atomic_save(
            {name: {key: torch.stack(values) if key != "steps" else torch.tensor(values) for key, values in record.items()}
             for name, record in self.health.items()},
            folder / "unit_health.pt",
        )  # fmt: skip
        if trainer.state.fn != "fit":  # during fit the shares are on the dashboard as lines; the plot comes at its end
            self.submit_shares(trainer, folder)
        for logger in loggers:
            table = [[name, d, t, d / t] for name, d, t in rows]
            logger.log_table("dead/table", columns=["layer", "dead", "units", "fraction"], data=table, step=step)
        self.figures.submit(functools.partial(self.draw, rows, title, folder / "dead_units.png", loggers, step))

    @staticmethod
    def draw(rows: list[tuple[str, int, int]], title: str, path: Path, loggers: list, step: int) -> None:
        """The bar chart, in the run folder and W&B (runs on the figure thread)."""
        dead_units_figure(rows, title, path)
        for logger in loggers:
            logger.log_image("dead/per_layer", [str(path)], step=step)

    def submit_shares(self, trainer: pl.Trainer, folder: Path) -> None:
        """The dormant-share plot of the record so far, drawn on the figure thread."""
        shares = {name: (record["steps"], [float(d.float().mean()) for d in record["dormant"]])
                  for name, record in self.health.items()}  # fmt: skip
        title = f"dormant share (tau {self.health_tau:g}, {self.split})"
        path, loggers, step = folder / "dormant_share.png", wandb_loggers(trainer), logged_step(trainer)
        self.figures.submit(functools.partial(self.draw_shares, shares, title, path, loggers, step))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = run_folder(trainer)  # on every rank (a collective under DDP)
        if trainer.is_global_zero and folder is not None and self.health:
            self.submit_shares(trainer, folder)

    @staticmethod
    def draw_shares(shares: dict, title: str, path: Path, loggers: list, step: int) -> None:
        """The dormant share against step per layer, in the run folder and W&B (runs on the figure thread)."""
        dormant_share_figure(shares, title, path)
        for logger in loggers:
            logger.log_image("dormant/share_vs_step", [str(path)], step=step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.figures.wait()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self.figures.wait()
