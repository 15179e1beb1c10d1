"""The framework's command line: LightningCLI with its defaults, the run's state decided once, its config saved,
and every error in one line."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

import torch.distributed as dist
import yaml
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from callbacks.complexity import Complexity
from lightning_modules.errors import ConfigError, UserError, require
from lightning_modules.run.checkpoints import check_fits, keep_last_epoch
from lightning_modules.run.config_files import config_name
from lightning_modules.run.console import end_progress_bars, quiet_libraries, say
from lightning_modules.run.loggers import default_loggers, start_wandb
from lightning_modules.run.parse_errors import ShortErrorParser, plain, trainer_problem
from lightning_modules.run.requeue import Requeue, Requeued, requeued_checkpoint, slurm_job_id
from lightning_modules.run.run_folder import (
    last_checkpoint,
    run_folder,
    run_folder_of,
    training_differences,
    unfinished_study,
)
from lightning_modules.run.run_state import Checkpoint, Run
from lightning_modules.run.trainer import ResearchTrainer
from lightning_modules.studies import noise, plasticity, propagate, search, similarity, sweep

SPECIAL_CHECKPOINTS = ("best", "hpc", "registry")  # Lightning resolves these itself ("last" is resolved here)
STUDIES = {  # each study's last file: a folder of the same command without it is continued by that command
    "search": search.FILES.final,
    "sweep": sweep.FILES.final,
    "propagate": propagate.FILES["md"],
    "noise": noise.FILES["md"],
    "plasticity": plasticity.FILES.final,
    "similarity": similarity.FILES["md"],
}
WITH_TRIALS = ("search", "sweep", "plasticity")  # studies whose trials log W&B runs of their own, in the study's group
TRAINING_SETTINGS = (  # what shapes a run's training: a resume with other values would be another run's
    *("seed_everything", "model", "data", "budget", "trainer.precision", "trainer.accumulate_grad_batches"),
    *("trainer.gradient_clip_val", "trainer.gradient_clip_algorithm"),
)


class RunConfig(SaveConfigCallback):
    """Saves the resolved config into the run folder (beside its checkpoints) and into W&B's run config, records
    the folder's W&B run so that a resumed run continues it, and removes a new run's folder and W&B run again
    when the run fails before it trains."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.folder = run_folder(trainer)  # on every rank (a broadcast): `save_config` runs on rank 0 alone
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams(config)  # sent once the W&B run has started
        if stage not in STUDIES:  # the data is set up: the run can train, W&B starts (a study starts its own later)
            start_wandb(trainer.loggers, self.folder)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if getattr(trainer, "run", None) is not None:
            trainer.run.discard_if_untrained(trainer)


class ResearchCLI(LightningCLI):
    """`python train.py fit|validate|test|count|propagate|search|sweep|noise|plasticity|similarity --config C`."""

    def __init__(self, **kwargs):
        kwargs.setdefault("trainer_class", ResearchTrainer)
        kwargs.setdefault("save_config_callback", RunConfig)
        kwargs.setdefault("auto_configure_optimizers", False)  # optimizers are the LightningModule's own arguments
        kwargs.setdefault("trainer_defaults", {"default_root_dir": "runs"})
        kwargs.setdefault("parser_kwargs", {"parser_mode": "yaml"})
        kwargs.setdefault("parser_class", ShortErrorParser)
        self.run: Run | None = None
        self.checkpoint: Checkpoint | None = None
        self.requested = requested_subcommand(kwargs.get("args"), self.subcommands())
        super().__init__(**kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        """Build the parser of the subcommand this command runs alone: each takes a tenth of a second (the Trainer's
        and the model's signatures), and building all ten was half a second of every start. Without one (`--help`,
        a typo) all are built, so the help and the error list them."""
        if self.requested is None:
            return super()._add_subcommands(parser, **kwargs)
        every, wanted = self.subcommands(), self.requested
        self.subcommands = lambda: {wanted: every[wanted]}  # Lightning's loop reads this instance's subcommands()
        try:
            super()._add_subcommands(parser, **kwargs)
        finally:
            del self.subcommands

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        kwargs.setdefault("allow_abbrev", False)  # `--trainer.max_epoch` is a typo, not max_epochs
        return super().init_parser(**kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        lightning = {name: keys for name, keys in LightningCLI.subcommands().items() if name != "predict"}
        return {  # no `predict`: the datamodules have no prediction data, and nothing would keep the predictions
            **lightning,
            # `--verbose` is this project's on every subcommand; validate/test print Lightning's results table always
            "validate": {*lightning["validate"], "verbose"},
            "test": {*lightning["test"], "verbose"},
            "count": {"model", "datamodule"},
            "propagate": {"model", "datamodule"},
            "search": {"model", "datamodule"},
            "sweep": {"model", "datamodule"},
            "noise": {"model", "datamodule"},
            "plasticity": {"model", "datamodule"},
            "similarity": {"model", "datamodule"},
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
            "--verbose", type=bool, default=False, help="Also show what only the libraries say (Lightning, W&B)."
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

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse; then quiet the libraries, and read `--ckpt_path` before Lightning does: `last` is the newest
        last.ckpt of this run's name, a requeued SLURM job finds its own, and a missing or unreadable file is one
        line here rather than Lightning's traceback."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand or "", None)
        loud = bool(config.get("verbose")) if config is not None else False
        quiet_libraries(verbose=loud or os.environ.get("NETLAB_VERBOSE", "") not in ("", "0"))
        if config is None:
            return
        path = config.get("ckpt_path")
        root = Path(config.trainer.default_root_dir) / run_name(config)
        if path == "last":
            path = config.ckpt_path = str(last_checkpoint(root))
        job = slurm_job_id() if subcommand == "fit" and not path else None
        if job and (requeued := requeued_checkpoint(root, job)) is not None:  # a requeued SLURM job: carry on
            path = config.ckpt_path = str(requeued)
            say(f"SLURM: job {job} was requeued; resuming from {requeued}")
        if path and path not in SPECIAL_CHECKPOINTS:
            self.checkpoint = Checkpoint.read(path)

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
        if self.subcommand:
            name = run_name(config)
            root = Path(config.trainer.default_root_dir)
            self.run = Run.start(name, root, self.continued_folder(config, root / name), self.checkpoint)
            self.save_config_kwargs["overwrite"] = self.run.continues  # a run continued in place rewrites its config

    def continued_folder(self, config, runs: Path) -> Path | None:
        """The run folder this run continues: a fit's checkpoint's own, or a killed study's with the same config."""
        if self.subcommand == "fit" and self.checkpoint is not None:
            folder = run_folder_of(self.checkpoint.path)
            if folder is not None:
                self.check_same_training(config, folder)
                say(f"resuming {folder} at step {self.checkpoint.step} ({self.checkpoint.path})")
            return folder
        if self.subcommand in STUDIES:
            dumped = self._parser(self.subcommand).dump(config, skip_none=False)  # see library_internals
            folder = unfinished_study(runs, dumped, STUDIES[self.subcommand])
            if folder is not None:
                say(f"{self.subcommand}: continuing {folder}, which this command started and did not finish")
            return folder
        return None

    def check_same_training(self, config, folder: Path) -> None:
        """Refuse to resume a run folder whose saved config trained otherwise (data, model, optimizer, seed, ...):
        that would continue its metrics and W&B run, and rewrite its config.yaml, with another config's."""
        saved = folder / "config.yaml"
        if not saved.is_file():
            return
        current = yaml.safe_load(self._parser("fit").dump(config, skip_none=False))  # see library_internals
        listed = training_differences(yaml.safe_load(saved.read_text()) or {}, current, TRAINING_SETTINGS)
        if listed:
            try:
                name = folder.parent.resolve().relative_to(Path(config.trainer.default_root_dir).resolve()).as_posix()
            except ValueError:
                name = folder.parent.name
            raise ConfigError(
                f"--ckpt_path {self.checkpoint.path} is a checkpoint of {folder}, which trained with another config "
                f"(it differs in {listed}): resume that run with its own, --config {saved} --name {name}"
            )

    def instantiate_classes(self) -> None:
        """Build the configured classes; a value that a class refuses (a ValueError in its constructor) is one line."""
        try:
            super().instantiate_classes()
        except ValueError as e:
            if isinstance(e, UserError):
                raise
            raise ConfigError(plain(str(e)) or " ".join(str(e).split())) from e

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self.checkpoint is not None:
            check_fits(self.model, self.checkpoint.keys, self.checkpoint.path)

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        run, given = self.run, config.trainer.get("logger")
        if self.subcommand == "count":
            kwargs["logger"] = False
        elif run is not None and given is not False:
            checkpoint = self.checkpoint
            resume = (checkpoint.epoch, checkpoint.logged_step) if self.subcommand == "fit" and checkpoint else None
            study = self.subcommand in WITH_TRIALS
            # a logger the user adds joins the run's CSV and W&B (a W&B logger of their own takes the run's W&B place)
            added = [] if given in (None, True) else list(given) if isinstance(given, Iterable) else [given]
            wandb = config.wandb and not any(isinstance(logger, WandbLogger) for logger in added)
            kwargs["logger"] = [*default_loggers(run, config.project, wandb, resume, study), *added]
            if not run.continues:  # this run's own new folder: removed again if the run fails before it trains
                run.new_folder = Path(kwargs["logger"][0].log_dir)
        job = slurm_job_id() if self.subcommand == "fit" else None
        if job and config.trainer.get("plugins") is None:  # requeue into the run's folder, not Lightning's way
            kwargs["plugins"] = [SLURMEnvironment(auto_requeue=False)]
        check_trainer(config.trainer)
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, TypeError, ValueError) as e:  # Lightning's own checks of its settings
            raise ConfigError(trainer_problem(e, config.trainer.get("accelerator"))) from e
        keep_last_epoch(trainer.callbacks)
        if str(config.trainer.get("precision")) in ("16", "16-mixed") and trainer.precision == "bf16-mixed":
            say(
                f"--trainer.precision {config.trainer.precision}: fp16 mixed precision needs a GPU; "
                "this run trains in bf16-mixed"
            )  # Lightning's own warning of the swap is filtered (console.py)
        if (
            config.trainer.get("sync_batchnorm")
            and trainer.world_size > 1
            and trainer.strategy.root_device.type == "cpu"
        ):
            raise ConfigError("sync_batchnorm runs on GPUs only (PyTorch's SyncBatchNorm): unset it to train on CPUs")
        if job and config.trainer.get("plugins") is None:
            trainer.callbacks.append(Requeue(job))
        trainer.run = run
        return trainer

    def save_study_config(self) -> None:
        """Lightning saves a fit's config when it sets up the fit; a study saves its own before it starts."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunConfig):
                callback.setup(self.trainer, self.model, stage=self.subcommand)

    def say_untrained(self) -> None:
        """`validate` or `test` without a checkpoint evaluates the net as initialised: said in a line, since a user
        rarely means that."""
        if self.config[self.subcommand].get("ckpt_path") is None:
            verb = {"validate": "validates", "test": "tests"}[self.subcommand]
            say(
                f"{self.subcommand}: no --ckpt_path, so the net is the untrained one, as initialised; "
                f"--ckpt_path last {verb} this config's newest run"
            )

    def after_fit(self) -> None:
        """A resume from a checkpoint already at the end of the configured training trains nothing: said in a line."""
        trainer, checkpoint = self.trainer, self.checkpoint
        if checkpoint is None or trainer.global_step > checkpoint.step or not trainer.state.finished:
            return
        if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
            limit = f"--trainer.max_steps {trainer.max_steps}"
        elif trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs:
            limit = f"--trainer.max_epochs {trainer.max_epochs}"
        else:
            return
        say(
            f"fit: nothing trained: {checkpoint.path} is at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}, where this config's training ends ({limit}); raise it to train on"
        )

    # LightningCLI's before_<subcommand> hooks
    before_search = before_sweep = before_noise = before_propagate = before_plasticity = save_study_config
    before_similarity = save_study_config
    before_validate = before_test = say_untrained


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


def requested_subcommand(args, subcommands: dict) -> str | None:
    """The subcommand a command line names first (`fit` in `fit --config ...`), or None."""
    argv = sys.argv[1:] if args is None else args
    if not isinstance(argv, list | tuple) or not argv:
        return None
    return str(argv[0]) if str(argv[0]) in subcommands else None


def main(args: list[str] | None = None) -> None:
    """Run the CLI; a problem the user fixes by hand (data, settings, a checkpoint, divergence) ends in one line."""
    try:
        ResearchCLI(args=args)
    except UserError as e:
        end_progress_bars()
        sys.exit(f"error: {e}")
    except Requeued:
        sys.exit(0)  # SLURM runs the job again, which resumes from the requeue checkpoint
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """Destroy the DDP process group while the interpreter is whole. Lightning does so at exit for NCCL only; a
    gloo group left to interpreter shutdown now and then aborts a rank ("terminate called without an active
    exception") after a run that succeeded."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
