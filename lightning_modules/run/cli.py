"""The framework's command line: LightningCLI with its defaults, per-run config saving and clear errors."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import sys
from pathlib import Path

import pytorch_lightning as pl
import yaml
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from callbacks.complexity import Complexity
from lightning_modules.errors import ConfigError, UserError, require
from lightning_modules.run.checkpoints import check_fits, check_version, keep_last_epoch, read_checkpoint, state_dict_of
from lightning_modules.run.console import end_progress_bars, quiet_libraries, say
from lightning_modules.run.loggers import RunWandbLogger, default_loggers
from lightning_modules.run.parse_errors import plain
from lightning_modules.run.requeue import Requeue, Requeued, requeued_checkpoint, slurm_job_id
from lightning_modules.run.run_folder import (
    WANDB_ID,
    discard,
    last_checkpoint,
    run_folder,
    run_folder_of,
    unfinished_study,
    untrained,
)
from lightning_modules.run.trainer import SWEEP_PROGRESS, ResearchTrainer, config_name

SPECIAL_CHECKPOINTS = ("best", "hpc", "registry")  # Lightning resolves these itself ("last" is resolved here)
STUDIES = ("search", "sweep", "noise")  # subcommands that train or evaluate without Lightning's fit
STUDY_FILES = {  # a study's (progress, final) files: a killed study is continued by the same command
    "search": ("results.csv", "results.md"),
    "sweep": (SWEEP_PROGRESS, "runs.md"),
}


class RunConfig(SaveConfigCallback):
    """Saves the resolved config into the run folder (beside its checkpoints) and into W&B's run config, and
    records the folder's W&B run so that a resumed run continues it."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.overwrite = getattr(trainer, "resumes_folder", False)  # a run resumed in place rewrites its config
        self.folder = run_folder(trainer)  # on every rank (a broadcast): `save_config` runs on rank 0 alone
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams(config)
                if self.folder is not None:
                    (self.folder / WANDB_ID).write_text(str(logger.version))
                if isinstance(logger, RunWandbLogger):  # the data is set up: the run can train, W&B starts
                    logger.announce()
                    logger.start()


def did_you_mean(message: str, keys: list[str]) -> str:
    """`; did you mean --trainer.max_epochs?` for the first unknown key a parser error names (empty if none close)."""
    names = re.findall(r"--([\w.]+)|(?:[Kk]ey|option) ['\"]([\w.]+)['\"]", message)
    for name in (a or b for a, b in names):
        close = difflib.get_close_matches(name, keys, n=2, cutoff=0.75)
        if close and name not in keys:
            return "; did you mean " + " or ".join(f"--{c}" for c in close) + "?"
    return ""


class ShortErrorParser(LightningArgumentParser):
    """Parse errors as the error first and short, with the closest valid keys; the usage is left to --help."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        subparsers = getattr(getattr(parser, "_subcommands_action", None), "choices", None) or {}
        keys = [a.dest for p in (parser, *subparsers.values()) for a in p._actions if a.dest not in (None, "help")]
        lines = [line for line in message.strip().splitlines() if line.strip()]
        short = plain(message) or " ".join(line.strip() for line in lines[:6]) + (" ..." if len(lines) > 6 else "")
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {short}{did_you_mean(message, keys)}\n({prog} --help lists every option)\n")
        self.exit(2)


class ResearchCLI(LightningCLI):
    """`python train.py fit|validate|test|count|search|sweep|noise --config C`."""

    def __init__(self, **kwargs):
        kwargs.setdefault("trainer_class", ResearchTrainer)
        kwargs.setdefault("save_config_callback", RunConfig)
        kwargs.setdefault("auto_configure_optimizers", False)  # optimizers are the LightningModule's own arguments
        kwargs.setdefault("trainer_defaults", {"default_root_dir": "runs"})
        kwargs.setdefault("parser_kwargs", {"parser_mode": "yaml"})
        kwargs.setdefault("parser_class", ShortErrorParser)
        super().__init__(**kwargs)

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        kwargs.setdefault("allow_abbrev", False)  # `--trainer.max_epoch` is a typo, not max_epochs
        return super().init_parser(**kwargs)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand not in ("validate", "test"):  # theirs is Lightning's: print the results table
            parser.add_argument(
                "--verbose", type=bool, default=False, help="Also show what only the libraries say (Lightning, W&B)."
            )
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand or "", self.config)
        loud = config.get("verbose") if subcommand not in ("validate", "test") else False
        quiet_libraries(verbose=bool(loud) or os.environ.get("NETLAB_VERBOSE", "") not in ("", "0"))

    def _parse_ckpt_path(self) -> None:
        """Lightning reads `--ckpt_path` here, before anything else: a missing or unreadable file is one line.
        `last` is the newest last.ckpt of this run's name. The checkpoint's keys are kept, to check them
        against the model once it is built, and its epoch and step, to continue its folder's metrics."""
        config = self.config.get(self.config.get("subcommand") or "", None)
        path = config.get("ckpt_path") if config is not None else None
        self.checkpoint_keys = self.checkpoint_position = None
        root = Path(config.trainer.default_root_dir) / run_name(config) if config is not None else None
        if path == "last":
            path = config.ckpt_path = str(last_checkpoint(root))
        job = slurm_job_id() if self.config.get("subcommand") == "fit" and not path else None
        if job and (requeued := requeued_checkpoint(root, job)) is not None:  # a requeued SLURM job: carry on
            path = config.ckpt_path = str(requeued)
            say(f"SLURM: job {job} was requeued; resuming from {requeued}")
        if path and path not in SPECIAL_CHECKPOINTS:
            checkpoint = read_checkpoint(path)
            check_version(checkpoint, path)
            self.checkpoint_keys = set(state_dict_of(checkpoint, path))
            self.checkpoint_position = int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0))
        super()._parse_ckpt_path()

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self.checkpoint_keys is not None:
            check_fits(self.model, self.checkpoint_keys, self.config_init[self.subcommand].ckpt_path)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            **LightningCLI.subcommands(),
            "count": {"model", "datamodule"},
            "search": {"model", "datamodule"},
            "sweep": {"model", "datamodule"},
            "noise": {"model", "datamodule"},
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--name",
            type=str | None,
            default=None,
            help="Run name: runs/<name>/version_N and the W&B run name (default: the config's path under configs/).",
        )
        parser.add_argument("--project", type=str, default="netlab", help="W&B project.")

        parser.add_argument(
            "--wandb", type=bool, default=True, help="Log to W&B (offline when there is no key or network)."
        )
        parser.add_argument(
            "--budget",
            type=float | None,
            default=None,
            help="A parameter budget for the whole net: the net's substitute hyperparameter is chosen to meet it.",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/err",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:03d}-err{val/err:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(Complexity, "complexity")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("weights_only", True) is None:
            config.weights_only = True  # never unpickle a checkpoint: it holds state dicts and primitives only
        if config.get("budget") is not None:
            net = config.get("model.init_args.net.init_args")
            if net is None or "budget" not in net:
                raise ConfigError("--budget needs a net with a `budget` argument (lightning_modules.nets.WideResNet)")
            net.budget = config.budget
        if config.get("variants"):
            config.variants = variant_paths(config)

    def instantiate_classes(self) -> None:
        """Build the configured classes; a value that a class refuses (a ValueError in its constructor) is one line."""
        try:
            super().instantiate_classes()
        except ValueError as e:
            if isinstance(e, UserError):
                raise
            raise ConfigError(plain(str(e)) or " ".join(str(e).split())) from e

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        name, root = run_name(config), Path(config.trainer.default_root_dir)
        folder = self.resumed_folder(config, root / name)
        self.new_folder = None
        if self.subcommand == "count":
            kwargs["logger"] = False
        elif config.trainer.get("logger") in (None, True):
            position = self.checkpoint_position if self.subcommand == "fit" else None
            study = self.subcommand in STUDY_FILES  # its trials log W&B runs of their own, in the study's group
            kwargs["logger"] = default_loggers(name, str(root), config.project, config.wandb, folder, position, study)
            if folder is None:  # this run's own new folder: removed again if the run fails before it trains
                self.new_folder = Path(kwargs["logger"][0].log_dir), root
        job = slurm_job_id() if self.subcommand == "fit" else None
        if job and config.trainer.get("plugins") is None:  # requeue into the run's folder, not Lightning's way
            kwargs["plugins"] = [SLURMEnvironment(auto_requeue=False)]
        check_trainer(config.trainer)
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, TypeError, ValueError) as e:  # Lightning's own checks of its settings
            raise ConfigError(trainer_problem(e, config.trainer)) from e
        keep_last_epoch(trainer.callbacks)
        if (
            config.trainer.get("sync_batchnorm")
            and trainer.world_size > 1
            and trainer.strategy.root_device.type == "cpu"
        ):
            raise ConfigError("sync_batchnorm runs on GPUs only (PyTorch's SyncBatchNorm): unset it to train on CPUs")
        if job and config.trainer.get("plugins") is None:
            trainer.callbacks.append(Requeue(job))
        trainer.run_name = name
        trainer.resumes_folder = folder is not None
        return trainer

    def resumed_folder(self, config, root: Path) -> Path | None:
        """The run folder this run continues: a fit's checkpoint's own, or a killed study's with the same config."""
        if self.subcommand == "fit" and config.get("ckpt_path") and config.ckpt_path not in SPECIAL_CHECKPOINTS:
            folder = run_folder_of(config.ckpt_path)
            if folder is not None:
                say(f"resuming {folder} at step {self.checkpoint_position[1]} ({config.ckpt_path})")
            return folder
        if self.subcommand in STUDY_FILES:
            dumped = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False)
            folder = unfinished_study(root, dumped, *STUDY_FILES[self.subcommand])
            if folder is not None:
                say(f"{self.subcommand}: continuing {folder}, which this command started and did not finish")
            return folder
        return None

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            if subcommand in STUDIES:  # Lightning saves the config when it sets up a fit; a study saves its own
                for callback in self.trainer.callbacks:
                    if isinstance(callback, RunConfig):
                        callback.setup(self.trainer, self.model, stage=subcommand)
            super()._run_subcommand(subcommand)
        except BaseException:
            if self.new_folder is not None and self.trainer.global_step == 0 and untrained(self.new_folder[0]):
                discard_wandb_runs(self.trainer)
                discard(*self.new_folder)
            raise


def check_trainer(trainer) -> None:
    """The trainer settings Lightning takes without a check and then fails on deep inside a run (a division by
    zero, a silent no-op), refused as one line."""
    require(
        "positive",
        **{f"--trainer.{key}": trainer.get(key) for key in ("accumulate_grad_batches", "check_val_every_n_epoch")},
        **{"--trainer.log_every_n_steps": trainer.get("log_every_n_steps")},
    )
    require("non_negative", **{f"--trainer.{key}": trainer.get(key) for key in ("gradient_clip_val", "min_epochs")})
    sanity = trainer.get("num_sanity_val_steps")
    if sanity is not None and sanity < -1:
        raise ConfigError(f"--trainer.num_sanity_val_steps must be 0 or more, or -1 (all), got {sanity}")


def trainer_problem(error: Exception, trainer) -> str:
    """Lightning's refusal of a trainer setting in the user's terms: a GPU asked for where none is visible, or its
    own message on one line."""
    asked = str(trainer.get("accelerator"))
    if asked in ("gpu", "cuda") and "backend" in str(error).lower():
        return (
            f"--trainer.accelerator {asked}: no GPU is visible here (torch.cuda.is_available() is False); "
            f"train on the CPU with --trainer.accelerator cpu"
        )
    return "trainer: " + " ".join(str(error).split())


def run_name(config) -> str:
    """`--name`, else the path under configs/ of the config that names the study (a search's `variants`: the study
    is that file) or of the first config (the experiment, not a preset stacked after it)."""
    configs = config.get("config") or []
    study = config.get("variants") and declaring_file(config, "variants")
    return config.get("name") or (config_name(str(study or configs[0])) if configs else "run")


def declaring_file(config, key: str) -> Path | None:
    """The last of the run's config files that sets `key` at its top level (the one whose value counts)."""
    for given in reversed(config.get("config") or []):
        path = Path(str(given))
        content = yaml.safe_load(path.read_text()) if path.is_file() else None
        if isinstance(content, dict) and key in content:
            return path
    return None


def variant_paths(config) -> dict[str, int]:
    """A search's variant configs as absolute paths: relative ones are found beside the config file that lists
    them (configs/depth/search_all.yaml lists `tanh.yaml`), else in the working directory."""
    beside = declaring_file(config, "variants")
    resolved = {}
    for given, bound in config.variants.items():
        path = Path(given)
        candidates = [beside.parent / path, path] if beside is not None and not path.is_absolute() else [path]
        found = next((candidate for candidate in candidates if candidate.is_file()), None)
        if found is None:
            where = f"beside {beside} or " if beside is not None else ""
            raise ConfigError(f"search variant {given}: no such config file ({where}in the working directory)")
        resolved[str(found.resolve())] = bound
    return resolved


def discard_wandb_runs(trainer: pl.Trainer) -> None:
    """Finish and remove the W&B runs of a run that failed before it trained (offline runs' folders; an online
    run is deleted on the server when it can be reached, else left marked as failed)."""
    for logger in trainer.loggers:
        if isinstance(logger, RunWandbLogger) and logger.started:
            logger.wait()
        run = getattr(logger, "_experiment", None) if isinstance(logger, WandbLogger) else None
        if run is None:
            continue
        folder = Path(run.dir).parent
        run.finish(exit_code=1)
        if run.settings._offline:
            shutil.rmtree(folder, ignore_errors=True)
            for link in folder.parent.iterdir():  # latest-run, debug.log, ...: W&B's links into the removed run
                if link.is_symlink() and not link.exists():
                    link.unlink()
            if not any(folder.parent.iterdir()):
                folder.parent.rmdir()
            continue
        try:
            import wandb

            wandb.Api().run(f"{run.entity}/{run.project}/{run.id}").delete()
        except Exception:  # noqa: BLE001 (best effort: the run stays, marked failed)
            pass


def main(args: list[str] | None = None) -> None:
    """Run the CLI; data, divergence and layer-selection problems end in one clear line, not a traceback."""
    try:
        ResearchCLI(args=args)
    except UserError as e:  # data, settings, checkpoints, divergence: one line, not a traceback
        end_progress_bars()
        sys.exit(f"error: {e}")
    except Requeued:
        sys.exit(0)  # SLURM runs the job again, which resumes from the requeue checkpoint
