"""Dead units: units whose activation never rises above a threshold over a whole split (research line 2).

A conv unit is an output channel (dead when it is <= threshold at every position of every sample),
a linear unit an output neuron. The running per-unit maximum is all the state: O(units) memory,
one `amax` per batch on the device, and an exact maximum over ranks once per epoch.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from callbacks.activation_observer import (
    ActivationObserver,
    all_reduce_max,
    layer_name,
    network_of,
    wandb_loggers,
)
from callbacks.figures import BackgroundFigures, dead_units_figure
from lightning_modules.run.console import say
from lightning_modules.run.files import atomic_save
from lightning_modules.run.run_folder import run_folder


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
    """Counts dead units per monitored layer at every validation epoch; logs `dead/<layer>` and `dead/total`.

    Also: a W&B table and a per-layer bar chart (`dead_units.png` in the run folder), a printed table,
    optionally the original study's consumer-keyed dict, and each unit's peak activation over the split
    (`dead_units/step<N>.pt`, per layer; how far from dead a unit is), loadable with weights_only=True.
    """

    def __init__(
        self,
        threshold: float = 0.0,
        consumer_keys: bool = False,
        **kwargs,
    ):
        """
        Args:
            threshold: a unit is dead when its activation is <= this for every sample (and position).
            consumer_keys: also print the original's format: per consuming layer, (dead inputs, inputs).
            **kwargs: which layers, over which data, how often: see `ActivationObserver`.
        """
        super().__init__(**kwargs)
        self.threshold, self.consumer_keys = threshold, consumer_keys
        self.maxima: dict[str, torch.Tensor] = {}
        self.counts: dict[str, tuple[int, int]] = {}
        self.peaks: dict[str, torch.Tensor] = {}  # per unit, of the last observation
        self.figures = BackgroundFigures()

    def start(self) -> None:
        self.maxima = {}

    def observe(self, name: str, output: torch.Tensor) -> None:
        if output.dim() > 2:  # positions first, then samples: twice as fast as one amax on channels_last maps
            output = output.amax(dim=tuple(range(2, output.dim())))
        batch_max = output.amax(dim=0).float() if output.dim() > 1 else output.float()
        previous = self.maxima.get(name)
        self.maxima[name] = batch_max if previous is None else torch.maximum(previous, batch_max)

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = [name for name in self.layers if name in self.maxima]
        if not names:
            return
        sizes = [len(self.maxima[name]) for name in names]
        maxima = all_reduce_max(torch.cat([self.maxima[name] for name in names]))  # one collective, all layers
        self.peaks = {name: peak.clone() for name, peak in zip(names, maxima.cpu().split(sizes), strict=True)}
        dead = [int(peak.le(self.threshold).sum()) for peak in self.peaks.values()]
        self.counts = {name: (d, t) for name, d, t in zip(names, dead, sizes, strict=True)}
        total_dead, total = sum(dead), sum(sizes)
        scalars = {f"dead/{name}": float(d) for name, (d, _) in self.counts.items()}
        scalars.update({"dead/total": float(total_dead), "dead/fraction": total_dead / total})
        pl_module.log_dict(scalars, sync_dist=True, reduce_fx="max")  # already the same on every rank
        folder = run_folder(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if trainer.is_global_zero:
            self.report(trainer, pl_module, folder, total_dead, total)

    def report(self, trainer, pl_module, folder: Path | None, total_dead: int, total: int) -> None:
        title = f"dead units ({self.split}, epoch {trainer.current_epoch}, step {trainer.global_step})"
        if self.print_table:
            width = max(len(name) for name in self.counts) + 2
            lines = [title] + [f"  {name:<{width}}{d:>6} / {t:<6}" for name, (d, t) in self.counts.items()]
            lines.append(f"  {'total':<{width}}{total_dead:>6} / {total:<6} ({total_dead / total:.1%})")
            if self.consumer_keys:
                keyed = consumer_keyed(network_of(pl_module), self.layers, self.counts)
                lines.append("{" + ",\n ".join(f"{k!r}: ({d}, {t})" for k, (d, t) in keyed.items()) + "}")
            say("\n".join(lines))
        rows = [(name, d, t) for name, (d, t) in self.counts.items()]
        if folder is None:
            return
        atomic_save(self.peaks, folder / "dead_units" / f"step{trainer.global_step:07d}.pt")
        loggers, step = wandb_loggers(trainer), trainer.global_step
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

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.figures.wait()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self.figures.wait()
