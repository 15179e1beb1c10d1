"""The private parts of other libraries that this project relies on, where no public API reaches, each with the
version it was written against and the code that uses it. `tests/test_library_internals.py` checks that every one
is still there, so an upgrade that removes one fails in that test, naming it, instead of deep inside a run.

Replaced by public hooks already (so not listed): LightningCLI's `_prepare_subcommand_parser` (now
`add_arguments_to_parser` and `subcommands()`), `_parse_ckpt_path` (now `parse_arguments`) and `_run_subcommand`
(now `before_<subcommand>` hooks and `Callback.on_exception`); wandb's `settings._offline` (now `settings.mode`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Internal:
    """One private name of a library: where it is (`module:attribute.path`), the version the code was written
    against, and the code that would break without it. `check` replaces the plain lookup where the name lives
    on an instance or has moved between versions the code accepts."""

    library: str
    written_against: str
    name: str
    used_by: str
    check: Callable[[], bool] | None = None

    def present(self) -> bool:
        if self.check is not None:
            return self.check()
        module, _, path = self.name.partition(":")
        owner = importlib.import_module(module)
        for part in path.split("."):
            if not hasattr(owner, part):
                return False
            owner = getattr(owner, part)
        return True


def _on_instance(module: str, cls: str, attribute: str, *args) -> Callable[[], bool]:
    """A check for an attribute that a class sets in __init__ only: on an instance built with `args`."""

    def check() -> bool:
        return hasattr(getattr(importlib.import_module(module), cls)(*args), attribute)

    return check


def _csv_writer_has(attribute: str) -> Callable[[], bool]:
    def check() -> bool:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            return _on_instance("pytorch_lightning.loggers.csv_logs", "ExperimentWriter", attribute, folder)()

    return check


def _log_interval_assigned() -> bool:
    from lightning_modules.run.trainer import ResearchTrainer

    trainer = ResearchTrainer(log_every_n_steps=7, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    return getattr(trainer, "_log_every_n_steps", None) == 7


def _batches_that_stepped() -> bool:
    import pytorch_lightning as pl

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    return isinstance(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None), int)


def _fused_unscales_in_step() -> bool:
    import torch

    fused = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], fused=True)
    return getattr(fused, "_step_supports_amp_scaling", False) is True


def _numpy_reconstruct() -> bool:
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 moved it; cifar10.py takes either
    return hasattr(core.multiarray, "_reconstruct")


INTERNALS = (
    Internal(
        "pytorch-lightning",
        "2.6.6",
        "pytorch_lightning.cli:LightningCLI._add_subcommands",
        "run/cli.py ResearchCLI._add_subcommands: only the requested subcommand's parser is built",
    ),
    Internal(
        "pytorch-lightning",
        "2.6.6",
        "pytorch_lightning.cli:LightningCLI._parser",
        "run/cli.py ResearchCLI.continued_folder: a study's config, dumped as RunConfig saves it, to find a killed "
        "study's folder",
    ),
    Internal(
        "pytorch-lightning",
        "2.6.6",
        "pytorch_lightning.loggers:WandbLogger._wandb_init",
        "run/loggers.py RunWandbLogger (its wandb.init settings) and studies/trials.py TrialRuns.of (the group)",
        _on_instance("pytorch_lightning.loggers", "WandbLogger", "_wandb_init"),
    ),
    Internal(
        "pytorch-lightning",
        "2.6.6",
        "pytorch_lightning.loggers:WandbLogger._offline",
        "studies/trials.py TrialRuns.of: whether the trials' runs are offline",
        _on_instance("pytorch_lightning.loggers", "WandbLogger", "_offline"),
    ),
    Internal(
        "pytorch-lightning",
        "2.6.6",
        "pytorch_lightning.loggers.csv_logs:ExperimentWriter._check_log_dir_exists",
        "run/loggers.py ContinuedWriter: a resumed run keeps its metrics.csv rows",
    ),
    Internal(
        "pytorch-lightning",
        "2.6.6",
        "pytorch_lightning.loggers.csv_logs:ExperimentWriter.metrics_keys",
        "run/loggers.py ContinuedWriter: the columns of a resumed metrics.csv",
        _csv_writer_has("metrics_keys"),
    ),
    Internal(
        "pytorch-lightning",
        "2.6.6",
        "pytorch_lightning.loggers:CSVLogger._fs",
        "run/loggers.py RunCSVLogger.experiment: the run folder created as Lightning's own logger does",
        _on_instance("pytorch_lightning.loggers", "CSVLogger", "_fs", "."),
    ),
    Internal(
        "pytorch-lightning",
        "2.6.6",
        "pytorch_lightning:Trainer.log_every_n_steps (assigned by Trainer.__init__)",
        "run/trainer.py ResearchTrainer.log_every_n_steps: Lightning assigns the interval as an attribute, which the "
        "property keeps as _log_every_n_steps and shortens to the epoch",
        _log_interval_assigned,
    ),
    Internal(
        "pytorch-lightning",
        "2.6.6",
        "pytorch_lightning:Trainer.fit_loop.epoch_loop._batches_that_stepped",
        "callbacks/activation_observer.py logged_step: the activation callbacks log at the step self.log uses",
        _batches_that_stepped,
    ),
    Internal(
        "torchmetrics",
        "1.9.0",
        "torchmetrics:Metric._reductions",
        "classifier.py Classifier.metric_states: a mid-epoch checkpoint's share of the epoch's train metrics",
        _on_instance("torchmetrics", "MeanMetric", "_reductions"),
    ),
    Internal(
        "torchmetrics",
        "1.9.0",
        "torchmetrics:Metric._update_count",
        "classifier.py Classifier.on_train_start: restored metric sums count as updated",
        _on_instance("torchmetrics", "MeanMetric", "_update_count"),
    ),
    Internal(
        "jsonargparse",
        "4.53.0",
        "jsonargparse:ArgumentParser._subcommands_action",
        "run/parse_errors.py ShortErrorParser: the valid keys of every subcommand, for `did you mean`",
        _on_instance("jsonargparse", "ArgumentParser", "_subcommands_action"),
    ),
    Internal(
        "jsonargparse",
        "4.53.0",
        "jsonargparse._instantiation:call_without_instantiate_context",
        "studies/trials.py portable: the CLI's optimizer and scheduler factories rebuilt without the CLI",
    ),
    Internal(
        "argparse",
        "Python 3.11",
        "argparse:ArgumentParser._actions",
        "run/parse_errors.py ShortErrorParser: the valid keys, for `did you mean`",
        _on_instance("argparse", "ArgumentParser", "_actions"),
    ),
    Internal(
        "tqdm",
        "4.70.1",
        "tqdm:tqdm._instances",
        "run/console.py end_progress_bars and bar_line_open: an error, and a table printed while a bar is open, "
        "start on a line of their own",
    ),
    Internal(
        "torch",
        "2.14.1",
        "torch.optim:Adam._step_supports_amp_scaling (set by a fused optimizer's __init__)",
        "callbacks/training_dynamics.py loss_scale: gradients a fused optimizer unscales in its own step are read "
        "still scaled",
        _fused_unscales_in_step,
    ),
    Internal(
        "numpy",
        "2.4.6",
        "numpy:_core.multiarray._reconstruct",
        "datamodules/cifar10.py: the only callable the CIFAR-10 batches' safe unpickler lets through",
        _numpy_reconstruct,
    ),
)
