"""Training a net whose convs are cheap substitutes (research line 4), with compression-scaled weight decay.

The weights of a substitute get wd x (its parameter count / that of the full conv it replaces), so
the prior's total variance matches the full net's; full convs, batch norm and the classifier keep
the optimizer's wd. The original found it essential for Shuffle and slightly harmful for
SepHashed, hence the switch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lightning_modules.classifier import Classifier
from lightning_modules.layers.substitutes import compression_ratios
from lightning_modules.run.console import say


class Compressed(Classifier):
    """The Classifier with compression-scaled weight decay for the net's substitute convs."""

    def __init__(self, net: nn.Module, scaled_weight_decay: bool = True, **kwargs):
        """
        Args:
            net: a net built with `layers.substitute_conv` (e.g. `lightning_modules.nets.WideResNet`).
            scaled_weight_decay: scale each substitute's weight decay (the optimizer's, as the base) by its
                compression ratio; `param_groups` patterns win over it.
            **kwargs: the Classifier's settings (optimizer, scheduler, param_groups, the divergence guard, ...).
        """
        super().__init__(net, **kwargs)
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
