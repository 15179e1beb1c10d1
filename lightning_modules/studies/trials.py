"""The trials of the studies as picklable callables, so that a launcher can run them here or in a Ray worker.

A trial carries what it trains on (the model template, the data on the CPU, no trainer) and seeds
itself, so that the same trial gives the same result in this process and in a worker.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from torch import nn

from datamodules.tensor_data import moved_splits
from lightning_modules.errors import DivergenceError
from lightning_modules.run.loggers import RunWandbLogger
from lightning_modules.studies.sweep import run_group


def bare_trainer(max_epochs: int, **kwargs) -> pl.Trainer:
    """A Trainer for a short fit inside another job (a search trial, a reference run): no logger,
    checkpoints, progress bar, model summary or sanity check."""
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(max_epochs=max_epochs, **{**defaults, **kwargs})


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


@dataclass
class TrialRuns:
    """Each trial's own W&B run, in the study's project and under the study's group (W&B's `group=`), so the
    dashboard shows the trials side by side and the study's run with its tables beside them."""

    project: str
    group: str
    save_dir: str
    offline: bool

    @classmethod
    def of(cls, trainer: pl.Trainer) -> TrialRuns | None:
        """The settings of the study's own W&B run (None when it logs to no W&B)."""
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                # the study's run starts first: Lightning's logger would take over a trial's run open at its start
                if isinstance(logger, RunWandbLogger):
                    logger.wait()
                else:
                    logger.experiment.id  # noqa: B018 (starts it)
                init = logger._wandb_init
                group = init.get("group") or f"{init.get('name') or 'study'}-{logger.version}"
                save_dir = str(Path(logger.save_dir or ".").resolve())  # absolute: a Ray worker has its own cwd
                return cls(init.get("project") or "netlab", group, save_dir, bool(logger._offline))
        return None

    def start(self, name: str, config: dict):
        """A new W&B run for one trial, beside any run this process already has open (the study's)."""
        import wandb

        return wandb.init(
            project=self.project,
            group=self.group,
            name=name,
            job_type="trial",
            config=config,
            dir=self.save_dir,
            mode="offline" if self.offline else None,
            reinit="create_new",  # Lightning's WandbLogger would reuse the study's open run instead
        )

    def log_finished(self, name: str, config: dict, history: list[dict], summary: dict) -> None:
        """One trial's run, logged after it trained (a sweep's stack trains its members together)."""
        run = self.start(name, config)
        for row in history:
            run.log({k: v for k, v in row.items() if isinstance(v, int | float) and k not in config}, step=row["epoch"])
        run.summary.update(summary)
        run.finish()


def portable(
    obj: pl.LightningModule | pl.LightningDataModule, device: torch.device | str = "cpu"
) -> pl.LightningModule | pl.LightningDataModule:
    """A shallow copy without its trainer (which is not sent to workers); a datamodule's splits on `device`."""
    copied = copy.copy(obj)
    copied.__dict__["_trainer" if isinstance(obj, pl.LightningModule) else "trainer"] = None
    for name, value in vars(obj).items():
        if _parsed_factory(value):  # the CLI's optimizer and scheduler factories hold its parser: keep their recipe
            copied.__dict__[name] = functools.partial(value.args[1], *value.args[2:], **value.keywords)
    if getattr(obj, "splits", None):
        copied.splits = moved_splits(obj.splits, device)
    return copied


def _parsed_factory(value) -> bool:
    """A callable argument the CLI parsed (`optimizer: OptimizerCallable`): jsonargparse's
    partial(call_without_instantiate_context, instantiator, class, **init_args), whose instantiator
    holds the CLI (and its trainer's locks), which no worker can receive."""
    return (
        isinstance(value, functools.partial)
        and getattr(value.func, "__name__", "") == "call_without_instantiate_context"
        and len(value.args) >= 2
        and isinstance(value.args[1], type)
    )


def worker_device(device: str | None) -> torch.device:
    """The device a trial was given, or (None) the worker's GPU when Ray gave it one, else the CPU."""
    return torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))


@dataclass
class DepthTrial:
    """The depth search's trials: `trial(variant, depth, seed)` trains that variant's net rebuilt at `depth`
    from `seed`, as `fit --seed_everything seed` would, and returns (train error, validation error), NaN
    when the loss diverged. One object for every variant, so a launcher sends the data once."""

    nets: dict[str, nn.Module]
    template: pl.LightningModule
    datamodule: pl.LightningDataModule
    epochs: int
    steps: int | None = None
    precision: str | int | None = None
    device: str | None = None  # "cpu" or "cuda:N"; None: the worker's GPU when it was given one, else the CPU
    runs: TrialRuns | None = None

    def __call__(self, variant: str, depth: int, seed: int) -> tuple[float, float]:
        """(training error, validation error) of the trained net, both measured after its last step in evaluation
        mode (the training error over the whole training split, not the running mean of its last batches)."""
        pl.seed_everything(seed, verbose=False)
        model = copy.deepcopy(self.template)
        model.net = self.nets[variant].at_depth(depth)
        device = worker_device(self.device)
        run = None
        if self.runs is not None:
            config = {"variant": variant, "depth": depth, "seed": seed, "epochs": self.epochs, "steps": self.steps}
            run = self.runs.start(f"{variant} k={depth} seed={seed}", config)
        with quiet_lightning():
            trainer = bare_trainer(
                -1 if self.steps else self.epochs,
                max_steps=self.steps or -1,
                accelerator="gpu" if device.type == "cuda" else "cpu",
                devices=[device.index or 0] if device.type == "cuda" else 1,
                precision=self.precision,
                logger=WandbLogger(experiment=run) if run is not None else False,
            )
            errors = None
            try:
                trainer.fit(model, datamodule=self.datamodule)
                if self.steps:  # a step budget can end inside an epoch, after its last validation
                    trainer.validate(model, datamodule=self.datamodule, verbose=False)
                val_err = float(trainer.callback_metrics["val/err"])
                errors = error_rate(trainer, model, self.datamodule.eval_dataloader("train")), val_err
            except DivergenceError:  # NaN, infinite or exploded loss: counted as diverged
                errors = math.nan, math.nan
            finally:
                if run is not None:  # a crashed trial's run is marked failed
                    if errors is not None:
                        run.summary.update({"train_err": errors[0], "val_err": errors[1]})
                    run.finish(exit_code=0 if errors is not None else 1)
        return errors


def error_rate(trainer: pl.Trainer, model: pl.LightningModule, loader) -> float:
    """The fraction of a loader's samples that a trained model gets wrong, in evaluation mode, at the trainer's
    precision and on its device."""
    wrong = torch.zeros((), dtype=torch.long, device=model.device)
    total = 0
    model.eval()
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        for x, y in loader:
            x, y = x.to(model.device), y.to(model.device)
            wrong += (model(x).argmax(dim=1) != y).sum()
            total += len(y)
    return int(wrong) / max(total, 1)


@dataclass
class StackTrial:
    """One stack of a sweep: `trial(points, seeds)` trains those same-shaped grid points for every seed as one
    SeedStack on a set-up in-memory datamodule and returns `run_group`'s (rows, history, variances)."""

    model: pl.LightningModule  # a Classifier-like module: its net is the template, its optimizer the recipe
    datamodule: pl.LightningDataModule
    epochs: int
    pca_samples: int = 2048
    pca_k: tuple[int, ...] = (1, 10, 50)
    zero_tol: float = 0.0
    device: str | None = None

    def __call__(self, points: list[dict], seeds: list[int]) -> tuple[list[dict], list[dict], list[torch.Tensor]]:
        device = worker_device(self.device)
        data = self.datamodule
        if next(iter(data.splits.values())).images.device != device:
            data = portable(data, device)
        rows, history, variances = run_group(
            self.model.net,
            points,
            seeds,
            data,
            self.epochs,
            self.model.build_optimizer,
            self.model.scheduler_factory,
            getattr(self.model, "penalty", 0.0),
            device,
            self.pca_samples,
            self.pca_k,
            self.zero_tol,
        )
        return rows, history, [v.cpu() for v in variances]
