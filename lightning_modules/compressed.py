"""Training a net whose convs are cheap substitutes (research line 4), with compression-scaled weight decay.

The weights of a substitute get wd x (its parameter count / that of the full conv it replaces), so
the prior's total variance matches the full net's; full convs, batch norm and the classifier keep
the optimizer's wd. The original found it essential for Shuffle and slightly harmful for
SepHashed, hence the switch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lightning_modules.classifier import Classifier
from lightning_modules.console import say
from lightning_modules.layers.substitutes import compression_ratios


class Compressed(Classifier):
    """The Classifier with compression-scaled weight decay for the net's substitute convs."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scaled_weight_decay: bool = True,
        param_groups: dict[str, dict[str, float]] | None = None,
        num_classes: int = 10,
        channels_last: bool = True,
        finite_check_every: int = 50,
    ):
        """
        Args:
            net: a net built with `layers.substitute_conv` (e.g. `lightning_modules.nets.WideResNet`).
            optimizer: builds the optimizer; its weight_decay is the base the substitutes' is scaled from.
            scheduler: builds an lr scheduler from the optimizer, stepped once per epoch.
            scaled_weight_decay: scale each substitute's weight decay by its compression ratio.
            param_groups: optimizer options per parameter-name pattern; they win over the scaled decay.
            num_classes: classes of the task.
            channels_last: keep 4-D weights and inputs in NHWC memory order.
            finite_check_every: check every this many steps that the loss stayed finite.
        """
        super().__init__(
            net, optimizer, scheduler, num_classes, channels_last, finite_check_every, param_groups=param_groups
        )
        self.scaled_weight_decay = scaled_weight_decay
        self.decay_by_module: dict[str, float] = {}

    def group_options(self) -> dict[str, dict[str, float]]:
        scaled = {f"net.{name}.*": {"weight_decay": wd} for name, wd in self.decay_by_module.items()}
        return {**self.param_groups, **scaled}  # a user's pattern matches first

    def build_optimizer(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> torch.optim.Optimizer:
        named = list(named_parameters)
        self.decay_by_module = {}
        optimizer = super().build_optimizer(named)  # to read the configured weight decay
        base = optimizer.defaults.get("weight_decay", 0.0)
        if not self.scaled_weight_decay or not base:
            return optimizer
        ratios = compression_ratios(self.net).items()
        self.decay_by_module = {name: base * ratio for name, ratio in ratios if ratio != 1}  # full convs keep it
        return super().build_optimizer(named)

    def on_fit_start(self) -> None:
        """Say which weight decay each kind of substitute got, and record it with the run's hyperparameters."""
        super().on_fit_start()
        if not self.decay_by_module:
            return
        distinct = sorted({round(wd, 12) for wd in self.decay_by_module.values()})
        say(
            f"compression-scaled weight decay: {len(self.decay_by_module)} substitute convs, "
            f"wd from {distinct[0]:.3g} to {distinct[-1]:.3g}"
        )
        for logger in self.loggers:
            logger.log_hyperparams({"weight_decay_by_module": self.decay_by_module})
