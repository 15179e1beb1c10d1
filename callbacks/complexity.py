"""Logs a model's parameters and mult-adds once, at the start of fit."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from lightning_modules.counting import count_model
from lightning_modules.run.console import say


class Complexity(pl.Callback):
    """Counts the trained net (params, mult-adds, original convention) and reports it to every logger."""

    def __init__(self, input_shape: tuple[int, ...] | None = None, per_layer: bool = False):
        """
        Args:
            input_shape: one sample's shape (C, H, W); default: the datamodule's `input_shape`.
            per_layer: also print the per-layer table.
        """
        self.input_shape = input_shape
        self.per_layer = per_layer

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:  # the count is deterministic: one rank does it
            return
        result = count_model(pl_module, trainer.datamodule, self.input_shape)
        say(result.summary() + ("\n" + result.table() if self.per_layer else ""))
        stats = {"complexity/params": result.params, "complexity/mult_adds": result.mult_adds}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(stats)
            else:
                logger.log_hyperparams(stats)
