"""The generic classifier: any `net`, cross-entropy, an injected optimizer and scheduler, accuracy per split."""

from __future__ import annotations

import math
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.errors import ConfigError, LossExplodedError, NonFiniteLossError, require
from lightning_modules.layers.kwinners import KWinnersBase
from lightning_modules.layers.sparse_weights import RezeroAfterStep
from lightning_modules.plasticity import Interventions, Plasticity
from lightning_modules.recycling import Recycler, Recycling
from lightning_modules.run.console import say
from lightning_modules.run.rank_seeds import seed_this_rank


class Classifier(pl.LightningModule):
    """Trains `net` with cross-entropy; logs `<split>/loss`, `<split>/acc`, `<split>/err` per epoch."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        num_classes: int = 10,
        channels_last: bool = True,
        finite_check_every: int = 50,
        param_groups: dict[str, dict[str, float]] | None = None,
        max_loss_ratio: float | None = 1000.0,
        max_loss: float | None = None,
        on_divergence: Literal["stop", "warn"] = "stop",
        recycle: Recycling | None = None,
        plasticity: Plasticity | None = None,
    ):
        """
        Args:
            net: the network; maps a batch of inputs to logits.
            optimizer: builds the optimizer from the parameters; default SGD(lr=0.01, momentum=0.9), the spec's.
            scheduler: builds an lr scheduler from the optimizer, stepped once per epoch; none by default.
            num_classes: classes of the task, for the accuracy metrics.
            channels_last: keep 4-D weights and inputs in NHWC memory order, which oneDNN (CPU) and
                cuDNN (GPU, tensor cores) run faster; results are the same up to float rounding.
            finite_check_every: check every this many steps (and at each epoch end) that the loss stayed
                finite and below the divergence limits (a check is a host sync, so it is not made every step).
            param_groups: optimizer options per parameter-name pattern (fnmatch), e.g.
                `{"*.bias": {weight_decay: 0}, "net.out.*": {lr: 0.1}}`; the first matching pattern wins and
                parameters no pattern matches keep the optimizer's own settings.
            max_loss_ratio: the loss diverged when a step's loss exceeds this multiple of the first step's
                (None: no ratio limit). A loss that explodes to 1e21 while staying finite is caught here.
            max_loss: the loss diverged when a step's loss exceeds this bound (None: no bound).
            on_divergence: `stop` the run with an error (the search counts the trial as diverged) or `warn`
                once and train on. A NaN or infinite loss always stops.
            recycle: recycle dormant units (ReDo) after every `every_n_steps` optimizer steps: units whose dormant
                score is at or below `tau` get fresh incoming weights from the net's own init, with zero outgoing
                weights and their optimizer state reset (the output is unchanged for exactly dead units; dormant
                ones that were alive move it, by `recycle/logit_change`); logs `recycle/<layer>/recycled` and
                `.../dormant_again` at each event, `.../fresh` at each validation. For nets with recyclable units
                (MLP, VGG, DepthCNN); off by default.
            plasticity: interventions against loss of plasticity on a task stream (spec 07, `lightning_modules.
                plasticity`): L2 towards the initial weights, shrink and perturb (at task boundaries or every step),
                head reset at task boundaries, continual backprop; off by default.
        """
        require(
            "positive", num_classes=num_classes, finite_check_every=finite_check_every, max_loss_ratio=max_loss_ratio
        )
        super().__init__()
        self.save_hyperparameters(
            ignore=["net", "teacher", "optimizer", "scheduler", "recycle", "plasticity"]
        )  # modules live in the state dict
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.channels_last = channels_last
        self.finite_check_every = finite_check_every
        self.param_groups = {pattern: dict(options) for pattern, options in (param_groups or {}).items()}
        self.max_loss_ratio, self.max_loss, self.on_divergence = max_loss_ratio, max_loss, on_divergence
        self.recycle, self.recycler, self.saved_recycling = recycle, None, None
        self.interventions = Interventions(plasticity, net) if plasticity is not None else None
        self.initial_weights = self.interventions.initial_weights(net) if self.interventions else None  # theta_0
        for split in ("train", "val", "test"):  # one set of metrics per split: train_metrics, val_metrics, ...
            setattr(
                self,
                f"{split}_metrics",
                nn.ModuleDict({"acc": MulticlassAccuracy(num_classes, average="micro"), "loss": MeanMetric()}),
            )
        self.register_buffer("loss_finite", torch.tensor(True), persistent=False)
        # the divergence guard, all on the device: the first loss, the largest so far, whether one exploded
        self.register_buffer("first_loss", torch.tensor(math.nan), persistent=False)
        self.register_buffer("peak_loss", torch.tensor(-math.inf), persistent=False)
        self.register_buffer("loss_exploded", torch.tensor(False), persistent=False)

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    def on_fit_start(self) -> None:
        # the net is built alike on every rank; from here each rank augments and drops out on its own stream
        seed_this_rank(self.global_rank, self.trainer.world_size)
        if self.interventions is not None:
            if self.interventions.needs_tasks() and not hasattr(self.trainer.datamodule, "steps_per_task"):
                raise ConfigError(
                    "plasticity: head_reset and shrink and perturb at task boundaries need a task stream "
                    "(data: datamodules.TaskStream); shrink_perturb_every: step needs none"
                )
            self.interventions.attach()
        if self.recycle is not None:  # a checkpoint's events and scores, else those of an earlier fit of this module
            if self.recycler is None:
                self.recycler = Recycler(self.recycle, self.net)
            if self.saved_recycling is not None:
                self.recycler.load_state_dict(self.saved_recycling, self.global_rank)
                self.saved_recycling = None
            self.recycler.attach()

    def on_fit_end(self) -> None:
        if self.recycler is not None:  # its hooks go; its events and scores stay for a checkpoint saved after the fit
            self.recycler.remove()
        if self.interventions is not None:
            self.interventions.remove()

    def as_input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of inputs in the memory order the net's weights use."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.as_input(x))

    # `<split>/loss` logs the loss optimised (task + extra); False: the task loss alone (LearnedSize's, comparable
    # with a net that has no extra terms)
    total_is_loss = True

    def task_loss(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of the task itself: cross-entropy (a student mixes in its teacher's soft targets)."""
        return F.cross_entropy(logits, y)

    def extra_loss(
        self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, split: str
    ) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
        """What a subclass adds to the task loss in `split` (a size penalty, attention transfer), and the values it
        logs per batch under names of its split's metrics (`<split>/<name>`). None here."""
        return 0.0, {}

    def step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        """One batch of a split: the loss (task + extra), and every metric of the split updated on the device."""
        x, y = batch
        x = self.as_input(x)
        logits = self.net(x)
        task = self.task_loss(x, logits, y)
        extra, logged = self.extra_loss(x, logits, y, split)
        loss = task + extra
        if self.interventions is not None and split == "train":
            loss = loss + self.interventions.penalty(self.net, self.initial_weights)
        metrics = getattr(self, f"{split}_metrics")
        metrics["acc"].update(logits.detach(), y)
        metrics["loss"].update((loss if self.total_is_loss else task).detach(), weight=len(y))
        if "task" in metrics:
            metrics["task"].update(task.detach(), weight=len(y))
        for name, value in logged.items():
            metrics[name].update(value.detach(), weight=len(y))
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.step(batch, "train")
        self.watch_loss(loss)
        return loss

    def watch_loss(self, loss: torch.Tensor) -> None:
        """Record, without a host sync, whether this step's loss is non-finite or past the divergence limits."""
        loss = loss.detach().float()
        self.loss_finite &= torch.isfinite(loss)
        if self.max_loss_ratio is None and self.max_loss is None:
            return
        self.first_loss.copy_(torch.where(torch.isnan(self.first_loss), loss, self.first_loss))
        self.peak_loss.copy_(torch.maximum(self.peak_loss, loss))
        if self.max_loss_ratio is not None:
            self.loss_exploded |= loss > self.max_loss_ratio * self.first_loss.abs()
        if self.max_loss is not None:
            self.loss_exploded |= loss > self.max_loss

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # ReDo's events come here, before the step Lightning logs at global_step: every checkpoint (written after a
        # step) lies between events, and what is logged before that step saw the net before the event
        if self.interventions is not None:
            stream = self.trainer.datamodule
            boundary = hasattr(stream, "steps_per_task") and self.global_step % stream.steps_per_task == 0
            self.log_event(self.interventions.before_step(self.net, self.trainer.optimizers[0], self.global_step,
                                                          boundary))  # fmt: skip
        if self.recycler is not None:
            self.log_event(self.recycler.step(self.global_step, self.trainer.optimizers[0], self.as_input(batch[0])))

    def log_event(self, report: dict[str, float]) -> None:
        """What an event that changed the weights before this step did: straight to the loggers, at its step and
        epoch as Lightning logs the step's own metrics (so a resumed run's metrics.csv drops it with them); the values
        are alike on every rank, so rank 0 logs them."""
        if report and self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics({**report, "epoch": self.current_epoch}, step=self.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % self.finite_check_every == 0:
            self.check_finite()

    def check_finite(self) -> None:
        """Raise NonFiniteLossError if any rank saw a non-finite loss since the start of training, and
        LossExplodedError (or warn, per `on_divergence`) if one saw a loss past the divergence limits."""
        strategy = self.trainer.strategy
        where = f"epoch {self.current_epoch}, step {self.global_step}"
        keep = "checkpoints saved before this are intact"
        if not strategy.reduce_boolean_decision(bool(self.loss_finite), all=True):
            raise NonFiniteLossError(
                f"the training loss became NaN or infinite ({where}); stopped. Lower the learning rate or check "
                f"the data; {keep}."
            )
        if self.max_loss_ratio is None and self.max_loss is None:
            return
        if not strategy.reduce_boolean_decision(bool(self.loss_exploded), all=False):
            return
        limits = (
            [f"{self.max_loss_ratio:g}x its first value {float(self.first_loss):.3g}"] if self.max_loss_ratio else []
        )
        limits += [f"the bound {self.max_loss:g}"] if self.max_loss is not None else []
        message = (
            f"the training loss exploded to {float(self.peak_loss):.3g} ({where}), past {' or '.join(limits)}"
        )  # fmt: skip
        if self.on_divergence == "stop":
            raise LossExplodedError(
                f"{message}; stopped. Lower the learning rate, or set model.init_args.max_loss_ratio / "
                f"on_divergence: warn; {keep}."
            )
        say(f"warning: {message}; training on (on_divergence: warn), not said again.")
        self.max_loss_ratio = self.max_loss = None  # warn once

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["first_loss"] = float(self.first_loss)  # the guard's reference survives a resume
        loop = self.trainer.fit_loop.epoch_loop.batch_progress.current
        # mid-epoch: at a requeue signal, or at a validation within the epoch (a task stream's end of task)
        if self.trainer.state.fn == TrainerFn.FITTING and 0 < loop.completed < self.trainer.num_training_batches:
            checkpoint["train_metric_states"] = self.metric_states("train")
        if self.recycler is not None:
            checkpoint["recycling"] = self.recycler.state_dict()
        if self.interventions is not None:
            checkpoint["plasticity"] = self.interventions.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.first_loss.fill_(checkpoint.get("first_loss", math.nan))
        self.saved_train_states = checkpoint.get("train_metric_states")
        self.saved_recycling = checkpoint.get("recycling")
        if self.interventions is not None:
            self.interventions.load_state_dict(checkpoint.get("plasticity", {}))

    def metric_states(self, split: str) -> dict[str, dict[str, torch.Tensor]]:
        """The epoch-so-far sums of a split's metrics, summed over ranks: a mid-epoch checkpoint's share of the
        epoch's train metrics, so that a run resumed there logs the same epoch metrics as an uninterrupted one."""
        states = {}
        for name, metric in getattr(self, f"{split}_metrics").items():
            states[name] = {}
            for state, reduce in metric._reductions.items():
                value = getattr(metric, state)
                if isinstance(value, torch.Tensor) and getattr(reduce, "__name__", "") == "dim_zero_sum":
                    states[name][state] = self.trainer.strategy.reduce(value.clone(), reduce_op="sum").cpu()
        return states

    def on_train_start(self) -> None:
        saved, self.saved_train_states = getattr(self, "saved_train_states", None), None
        if saved and self.trainer.is_global_zero:  # the whole sum on one rank: the epoch's reduction adds the rest
            for name, metric in self.train_metrics.items():
                for state, value in saved.get(name, {}).items():
                    setattr(metric, state, value.to(self.device))
                metric._update_count = max(metric._update_count, 1)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.step(batch, "test")

    def log_split(self, split: str) -> None:
        """Log the epoch's metrics of one split (`acc` also as `err`), synced over ranks, and reset them."""
        metrics = getattr(self, f"{split}_metrics")
        values = {f"{split}/{name}": metric.compute() for name, metric in metrics.items()}
        values[f"{split}/err"] = 1 - values[f"{split}/acc"]
        # compute() already reduced over ranks: every rank holds the same values, which max keeps exactly
        self.log_dict(values, prog_bar=split != "train", sync_dist=True, reduce_fx="max")
        for metric in metrics.values():
            metric.reset()

    def on_train_epoch_start(self) -> None:
        for module in self.net.modules():  # k-winners: boost strength of this epoch, exact on resume too
            if isinstance(module, KWinnersBase):
                module.set_epoch(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        self.check_finite()
        self.log_split("train")

    def on_validation_epoch_end(self) -> None:
        self.log_split("val")
        if self.recycler is not None and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            # the same on every rank, which max keeps exactly
            self.log_dict(self.recycler.fresh(self.global_step), sync_dist=True, reduce_fx="max")

    def on_test_epoch_end(self) -> None:
        self.log_split("test")

    def group_options(self) -> dict[str, dict[str, float]]:
        """Optimizer options per parameter-name pattern, in matching order (subclasses add their defaults)."""
        return self.param_groups

    def build_optimizer(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> torch.optim.Optimizer:
        """The configured optimizer over these parameters, grouped by the first pattern each matches."""
        groups = param_groups(named_parameters, self.group_options())
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(groups)
        else:
            optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
        RezeroAfterStep.attach(optimizer, self.net)  # sparse weights stay sparse after every step
        return optimizer

    def configure_optimizers(self):
        optimizer = self.build_optimizer(self.named_parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"},
        }


def param_groups(
    named_parameters: Iterable[tuple[str, torch.Tensor]], options: dict[str, dict[str, float]]
) -> list[dict]:
    """Optimizer parameter groups: one per matched pattern with its options (first match wins), one for the rest."""
    groups: dict[str | None, list[torch.Tensor]] = {}
    for name, param in named_parameters:
        if param.requires_grad:
            pattern = next((p for p in options if fnmatchcase(name, p)), None)
            groups.setdefault(pattern, []).append(param)
    # each group named for its pattern (`base`: the optimizer's own settings), as the learning-rate logs show it
    return [
        {"params": params, "name": pattern or "base", **options.get(pattern, {})} for pattern, params in groups.items()
    ]
