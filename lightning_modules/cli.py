"""The framework's command line: LightningCLI with its defaults, per-run config saving and clear errors."""

from __future__ import annotations

import difflib
import re
import sys

import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger

from callbacks.activation_observer import NoLayersError
from callbacks.complexity import Complexity
from datamodules.tensor_data import DataError
from lightning_modules.checkpoints import check_fits, keep_last_epoch, read_state_dict
from lightning_modules.classifier import ConfigError, NonFiniteLossError
from lightning_modules.loggers import default_loggers
from lightning_modules.trainer import ResearchTrainer, config_name

SPECIAL_CHECKPOINTS = ("last", "best", "hpc", "registry")  # Lightning resolves these itself


class RunConfig(SaveConfigCallback):
    """Saves the resolved config into the run folder (beside its checkpoints) and into W&B's run config."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams(config)


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
        short = " ".join(line.strip() for line in lines[:6]) + (" ..." if len(lines) > 6 else "")
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

    def _parse_ckpt_path(self) -> None:
        """Lightning reads `--ckpt_path` here, before anything else: a missing or unreadable file is one line.
        Its keys are kept, to check them against the model once it is built."""
        config = self.config.get(self.config.get("subcommand") or "", None)
        path = config.get("ckpt_path") if config is not None else None
        self.checkpoint_keys = None
        if path and path not in SPECIAL_CHECKPOINTS:
            self.checkpoint_keys = set(read_state_dict(path))
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

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        configs = config.get("config") or []
        # named for the first config (the experiment), not for a preset stacked after it
        name = config.name or (config_name(str(configs[0])) if configs else "run")
        if self.subcommand == "count":
            kwargs["logger"] = False
        elif config.trainer.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(name, config.trainer.default_root_dir, config.project, config.wandb)
        trainer = super().instantiate_trainer(**kwargs)
        keep_last_epoch(trainer.callbacks)
        trainer.run_name = name
        return trainer


def main(args: list[str] | None = None) -> None:
    """Run the CLI; data, divergence and layer-selection problems end in one clear line, not a traceback."""
    try:
        ResearchCLI(args=args)
    except (DataError, NonFiniteLossError, NoLayersError, ConfigError) as e:
        sys.exit(f"error: {e}")
