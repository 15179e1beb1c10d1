"""The machinery shared by the activation callbacks: pick layers, hook them over one split, reduce over ranks.

Observation rides along the validation batches (split `val`, no extra forward pass) or runs its
own no-grad pass over another split at the end of each validation epoch. Each rank counts its own
samples exactly once: samples a distributed sampler repeats to even out the ranks are cut off.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections import Counter
from typing import Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from torch import nn
from torch.utils.data import DistributedSampler

from datamodules.tensor_data import ShardedOrder
from lightning_modules.collectives import all_reduce_max
from lightning_modules.errors import ConfigError, require
from lightning_modules.run.console import say

DEFAULT_TYPES = ("ReLU", "ELU", "Tanh", "KWinners", "KWinners2d")


class NoLayersError(ConfigError):
    """An activation callback's `types` and `names` match no module of the net; the CLI prints it as one line."""


BLOCK_PARTS = ("act", "conv", "linear")


def layer_name(qualified: str) -> str:
    """A module's report name: its path in the net, with a block's part named by its block (conv1_1.act -> conv1_1)."""
    head, _, last = qualified.rpartition(".")
    return head if head and last in BLOCK_PARTS else qualified


def network_of(pl_module: nn.Module) -> nn.Module:
    """The plain net a LightningModule trains (its `net`), or the module itself."""
    return getattr(pl_module, "net", pl_module)


def select_layers(net: nn.Module, types: tuple[str, ...] | None, names: tuple[str, ...]) -> dict[str, nn.Module]:
    """Modules whose class name is in `types` (None: any class) and whose path matches a `names` pattern, by
    report name: a block's part goes by its block's name (`layer_name`) where that names nothing else chosen,
    and by its own path where it would (a block chosen with its `conv` and `act`: `conv1_1`, `conv1_1.conv`,
    `conv1_1.act`), so no two modules ever share a name."""
    chosen = {}
    for qualified, module in net.named_modules():
        if not qualified or (types is not None and type(module).__name__ not in types):
            continue
        if any(fnmatch.fnmatchcase(qualified, p) or fnmatch.fnmatchcase(layer_name(qualified), p) for p in names):
            chosen[qualified] = module
    return report_names(chosen)


def report_names(chosen: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Modules by path, renamed by `layer_name` where that names no other of them (else they keep their path)."""
    short = Counter(layer_name(qualified) for qualified in chosen)
    return {layer_name(q) if short[layer_name(q)] == 1 else q: module for q, module in chosen.items()}


def last_validation(trainer: pl.Trainer) -> bool:
    """Whether this epoch's validation is the fit's last: its last epoch (`max_epochs`), or no epoch ends again
    before `max_steps` (configs/presets/original_steps.yaml trains by steps, with max_epochs -1)."""
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.current_epoch + 1 >= trainer.max_epochs:
        return True
    if trainer.max_steps is not None and trainer.max_steps > 0:
        batches = trainer.num_training_batches
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else math.inf
        return trainer.global_step + per_epoch > trainer.max_steps
    return False


def samples_on_rank(loader) -> int | None:
    """How many distinct samples this rank's loader holds, when its sampler pads ranks to equal length."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, ShardedOrder):
        return len(range(sampler.rank, sampler.size, sampler.world_size))
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))
    return None


def batch_size_of(batch) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return len(first)


def agreed_sizes(sizes: dict[str, tuple[int, ...]], device: torch.device) -> dict[str, tuple[int, ...]]:
    """Per layer, the sizes of what the ranks observed (each the largest over ranks; 0 where no rank observed the
    layer), from every rank's `sizes` (an entry for every monitored layer, zeros where this rank saw no sample), in
    one collective: a rank that saw nothing learns the shapes it must enter the other collectives with."""
    table = all_reduce_max(torch.tensor(list(sizes.values()), dtype=torch.long, device=device))
    return {name: tuple(row) for name, row in zip(sizes, table.tolist(), strict=True)}


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def logged_step(trainer: pl.Trainer) -> int:
    """The step Lightning's own `self.log` logs at right now (in a validation during fit: the last step taken,
    one less than `global_step`), so a callback's keys share their rows and x-axis with the epoch's metrics."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def log_now(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Straight to every logger (CSV, W&B), at Lightning's step and with the epoch, as `self.log` would: dozens of
    keys through LightningModule.log cost a tenth of a second an epoch."""
    step = logged_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, step=step)


class ActivationObserver(pl.Callback):
    """Base of the callbacks that stream activations of chosen layers over a split, once per validation epoch.

    Subclasses implement `start` (reset state), `observe` (one batch of one layer's output, on the
    device, no host sync), and `finish` (reduce over ranks and report); `observe_input` when
    `wants_inputs` (pre-activations, captured before an in-place activation overwrites them).
    """

    wants_inputs = False

    def __init__(
        self,
        split: Literal["val", "train", "test"] = "val",
        max_batches: int | None = None,
        types: tuple[str, ...] | None = DEFAULT_TYPES,
        names: tuple[str, ...] = ("*",),
        every_n_epochs: int = 1,
        print_table: bool = True,
    ):
        """
        Args:
            split: the data observed: `val` rides along the validation batches; `train` or `test` runs an
                extra no-grad pass at the end of each validation epoch (the framework's datamodules only).
            max_batches: observe at most this many batches per device (like limit_val_batches); all by default.
            types: monitor modules of these class names (None: any class); by default the activations.
            names: and whose path in the net matches one of these patterns (fnmatch: `conv5_*`, `fc6`).
            every_n_epochs: observe every this many epochs (and always at the fit's last validation, whether
                training ends by max_epochs or by max_steps, and in `validate` and `test`).
            print_table: print the per-layer table at each observation.
        """
        if split not in ("val", "train", "test"):
            raise ConfigError(f"split must be 'val', 'train' or 'test', got {split!r}")
        require("positive", max_batches=max_batches, every_n_epochs=every_n_epochs)
        self.split, self.max_batches, self.every_n_epochs = split, max_batches, every_n_epochs
        self.types = list(types) if types is not None else None
        self.names, self.print_table = list(names), print_table
        self.layers: dict[str, nn.Module] = {}
        self._handles: list = []
        self._watching = False
        self._take = 0
        self._remaining: int | None = None

    # --- what a subclass implements -------------------------------------------------------------

    def start(self) -> None:
        raise NotImplementedError

    def observe(self, name: str, output: torch.Tensor) -> None:
        raise NotImplementedError

    def observe_input(self, name: str, x: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError

    # --- hooks ------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.layers = select_layers(network_of(pl_module), self.types, self.names)
        if not self.layers:
            raise NoLayersError(
                f"{type(self).__name__}: no module of types {self.types} matches names {self.names} in "
                f"{type(network_of(pl_module)).__name__}"
            )
        name = type(self).__name__
        if stage in ("fit", "validate") and trainer.limit_val_batches == 0:
            when = "rides along them" if self.split == "val" else f"runs its pass over {self.split} at their end"
            say(
                f"{name} observes nothing: --trainer.limit_val_batches 0 turns the validation epochs off, and it {when}"
            )
        elif stage == "test" and self.split != "test":
            say(f"{name} observes nothing in test: it observes the {self.split} split (split: test rides along the "
                "test batches)")  # fmt: skip
        elif stage == "test" and trainer.limit_test_batches == 0:
            say(f"{name} observes nothing: --trainer.limit_test_batches 0 turns the test epoch off")

    def _on_output(self, name: str, module: nn.Module, inputs, output) -> None:
        if self._take and isinstance(output, torch.Tensor):
            self.observe(name, output.detach()[: self._take])

    def _on_input(self, name: str, module: nn.Module, inputs) -> None:
        if self._take and inputs and isinstance(inputs[0], torch.Tensor):
            self.observe_input(name, inputs[0].detach()[: self._take])

    def _attach(self) -> None:
        self._detach()
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(functools.partial(self._on_output, name)))
            if self.wants_inputs:
                self._handles.append(module.register_forward_pre_hook(functools.partial(self._on_input, name)))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _due(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != "fit":
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0 or last_validation(trainer)

    def _begin(self, remaining: int | None) -> None:
        self.start()
        self._remaining = remaining
        self._watching = True
        self._attach()

    def _count_batch(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Decide how many rows of this batch the hooks see: none past max_batches or past the rank's samples."""
        take = batch_size_of(batch)
        if dataloader_idx or (self.max_batches is not None and batch_idx >= self.max_batches):
            take = 0
        if self._remaining is not None:
            take = min(take, self._remaining)
            self._remaining -= take
        self._take = take

    def _end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()
        self._watching, self._take = False, 0
        self.finish(trainer, pl_module)

    def _loop_start(self, trainer: pl.Trainer, loop: str) -> None:
        if self.split == loop and self._due(trainer):
            loaders = trainer.val_dataloaders if loop == "val" else trainer.test_dataloaders
            first = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            self._begin(samples_on_rank(first))

    def _loop_batch(self, batch, batch_idx: int, dataloader_idx: int) -> None:
        if self._watching:
            self._count_batch(batch, batch_idx, dataloader_idx)

    def _loop_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loop: str) -> None:
        if self._watching:
            self._end(trainer, pl_module)
        elif loop == "val" and self.split != "val" and self._due(trainer):
            self._own_pass(trainer, pl_module)

    def _own_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One no-grad pass over `split` in evaluation order (no shuffling, augmentation or padding)."""
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "eval_dataloader"):
            raise TypeError(
                f"{type(self).__name__}(split={self.split!r}) needs one of the framework's datamodules "
                f"(with eval_dataloader); with {type(datamodule).__name__} use split='val'"
            )
        loader = datamodule.eval_dataloader(self.split)
        self._begin(samples_on_rank(loader))
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                for batch_idx, batch in enumerate(loader):
                    if self.max_batches is not None and batch_idx >= self.max_batches:
                        break
                    batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                    self._count_batch(batch, batch_idx)
                    pl_module(batch[0])
        finally:
            pl_module.train(was_training)
        self._end(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loop_start(trainer, "val")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._loop_batch(batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loop_end(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loop_start(trainer, "test")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._loop_batch(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loop_end(trainer, pl_module, "test")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()
