"""The Trainer of this framework: Lightning's, plus the `count` and `search` subcommands."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from pathlib import Path

import pytorch_lightning as pl
import yaml
from jsonargparse import ArgumentParser
from pytorch_lightning.loggers import WandbLogger
from torch import nn

from lightning_modules.classifier import NonFiniteLossError
from lightning_modules.counting import Complexity, count_model
from lightning_modules.search import SearchResult, search_depth, write_results


def net_from_config(path: str | Path) -> nn.Module:
    """Build the `model.net` of a training config (class_path/init_args YAML), ignoring the rest of it.

    `path` may also be a net file (class_path/init_args at the top), and `model.net` a path to one,
    relative to the config, as jsonargparse reads it.
    """
    path = Path(path)
    config = yaml.safe_load(path.read_text()) or {}
    if "class_path" in config:
        net = config
    else:
        model = config.get("model", {})
        net = model.get("init_args", model).get("net")
        if net is None:
            raise ValueError(f"{path}: no model.net in this config")
        if isinstance(net, str):
            return net_from_config(path.parent / net)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=nn.Module)
    return parser.instantiate_classes(parser.parse_object({"net": net})).net


def config_name(path: str | Path) -> str:
    """A run's name from its config path: the part after `configs/`, without suffix (depth/resnet)."""
    parts = Path(path).with_suffix("").parts
    if "configs" not in parts[:-1]:
        return parts[-1]
    last = len(parts) - 1 - parts[::-1].index("configs")
    return "/".join(parts[last + 1 :])


@contextlib.contextmanager
def quiet_lightning():
    """Silence Lightning's per-Trainer info lines (GPU available, ...) for the many short fits of a search."""
    loggers = [
        logging.getLogger(n) for n in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class ResearchTrainer(pl.Trainer):
    """Lightning's Trainer with the framework's subcommands `count` and `search`."""

    def count(
        self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None, per_layer: bool = False
    ) -> Complexity:
        """Print the parameters and mult-adds of the model's net for one sample of the datamodule's input.

        Args:
            per_layer: also print a per-layer table.
        """
        result = count_model(model, datamodule)
        print(result.summary())
        if per_layer:
            print(result.table())
        return result

    def search(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        upper: int | None = None,
        seeds: int = 1,
        epochs: int = 3,
        max_error: float = 0.2,
        variants: dict[str, int] | None = None,
    ) -> list[SearchResult]:
        """Binary-search the deepest trainable depth k of the model's net, then confirm the boundary.

        Each depth trains `epochs` epochs from scratch per seed; it is trainable when the mean validation
        error over its seeds is below `max_error`. Writes results.csv, results.md and error_vs_depth.png
        into the run folder and logs the table to W&B.

        Args:
            upper: the largest depth to try (the search runs over k = 3, 6, ..., upper).
            seeds: seeds trained per depth (the confirmation uses fresh ones).
            epochs: epochs per trial (the spec: 3).
            max_error: trainability threshold on the validation error (the spec: 0.2).
            variants: instead of the model's own net, search each of these configs' `model.net`,
                mapped to its own upper bound; data, optimizer and trainer settings stay this run's.
        """
        if variants:
            jobs = [(config_name(path), net_from_config(path), bound) for path, bound in variants.items()]
        elif upper is not None:
            jobs = [(getattr(self, "run_name", None) or type(model.net).__name__, model.net, upper)]
        else:
            raise ValueError("search needs --upper (the largest depth to try) or --variants")
        for _, net, _ in jobs:
            if not hasattr(net, "at_depth"):
                raise TypeError(f"{type(net).__name__} has no at_depth(k): the search must rebuild it at other depths")
        first_seed = pl.seed_everything(verbose=False)  # the run's seed (seed_everything in the config)
        results = []
        for name, net, bound in jobs:
            print(
                f"search {name}: k in 3..{bound}, {seeds} seed(s) per depth, {epochs} epochs, trainable below {max_error:.0%}"
            )
            result = search_depth(
                self._trial_fn(model, net, datamodule, epochs), bound, seeds, max_error, first_seed, name
            )
            print(
                f"search {name}: deepest trainable k = {result.deepest} "
                f"({'confirmed' if result.confirmed else 'NOT confirmed: the boundary is noisy, try more --seeds'})"
            )
            results.append(result)
        self._report(results, max_error)
        return results

    def _trial_fn(self, template: pl.LightningModule, net: nn.Module, datamodule: pl.LightningDataModule, epochs: int):
        device = self.strategy.root_device

        def train(depth: int, seed: int) -> tuple[float, float]:
            pl.seed_everything(seed, verbose=False)
            model = copy.deepcopy(template)
            model.net = net.at_depth(depth)
            with quiet_lightning():
                trainer = pl.Trainer(
                    accelerator="gpu" if device.type == "cuda" else "cpu",
                    devices=[device.index or 0] if device.type == "cuda" else 1,
                    precision=self.precision,
                    max_epochs=epochs,
                    logger=False,
                    enable_checkpointing=False,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    num_sanity_val_steps=0,
                )
                try:
                    trainer.fit(model, datamodule=datamodule)
                    errors = float(trainer.callback_metrics["train/err"]), float(trainer.callback_metrics["val/err"])
                except NonFiniteLossError:
                    errors = math.nan, math.nan
            print(f"  k={depth:4d} seed={seed}: train err {errors[0]:.4f}, val err {errors[1]:.4f}", flush=True)
            return errors

        return train

    def _report(self, results: list[SearchResult], max_error: float) -> None:
        folder = Path(self.log_dir or self.default_root_dir)
        paths = write_results(results, max_error, folder)
        print(paths["md"].read_text())
        print(f"search results: {paths['csv']}, {paths['md']}, {paths['plot']}")
        trials = [t for r in results for t in r.trials]
        columns = list(vars(trials[0]))
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("search/trials", columns=columns, data=[list(vars(t).values()) for t in trials])
                logger.log_table(
                    "search/deepest",
                    columns=["variant", "upper", "deepest", "confirmed"],
                    data=[[r.variant, r.upper, r.deepest, r.confirmed] for r in results],
                )
                logger.log_image("search/error_vs_depth", [str(paths["plot"])])
