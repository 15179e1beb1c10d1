"""A run's folder, `runs/<name>/version_N`: found again to resume in place (its checkpoints, metrics.csv and
W&B run continue), and removed again when the run failed before it trained."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytorch_lightning as pl
import yaml

from lightning_modules.errors import ConfigError
from lightning_modules.run.files import atomic_write_csv

VERSION = re.compile(r"version_(\d+)")
WANDB_ID = "wandb_run_id"  # the W&B run of this folder, continued on resume
BOOKKEEPING = {"config.yaml", "hparams.yaml", "metrics.csv", WANDB_ID}  # what a run writes before it trains


def run_folder(trainer: pl.Trainer) -> Path | None:
    """Where a run's files go (beside its checkpoints and metrics.csv); None when nothing is logged (no logger, or
    `fast_dev_run`'s stand-in for them, which has no folder: nothing is written then, not even into runs/).

    A collective under DDP (`trainer.log_dir` broadcasts from rank 0): call it on every rank, never
    under `is_global_zero` or `rank_zero_only`, or the ranks wait for each other for ever.
    """
    if not trainer.loggers:
        return None
    folder = trainer.log_dir
    return Path(folder) if folder else None


def run_folder_of(checkpoint: str | Path) -> Path | None:
    """The run folder a checkpoint was saved into (`<folder>/checkpoints/X.ckpt`), or None for a file elsewhere."""
    path = Path(checkpoint)
    folder = path.parent.parent
    return folder if path.parent.name == "checkpoints" and VERSION.fullmatch(folder.name) else None


def versions(root: Path) -> list[Path]:
    """The `version_N` folders under `root`, oldest first."""
    found = [p for p in root.glob("version_*") if p.is_dir() and VERSION.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix("version_")))


def last_checkpoint(root: Path) -> Path:
    """`last.ckpt` of the newest run under `root` (runs/<name>) that has one: what `--ckpt_path last` resumes."""
    for folder in reversed(versions(root)):
        if (folder / "checkpoints" / "last.ckpt").is_file():
            return folder / "checkpoints" / "last.ckpt"
    raise ConfigError(f"--ckpt_path last: no {root}/version_*/checkpoints/last.ckpt to resume")


def unfinished_study(root: Path, config: str, finished: str) -> Path | None:
    """The newest run folder under `root` of a study with this resolved `config` (YAML) that has not written
    `finished`, its last file: a study killed halfway, or before its first trial, continued by the same command."""
    wanted = yaml.safe_load(config)
    for folder in reversed(versions(root)):
        saved = folder / "config.yaml"
        if not (folder / finished).exists() and saved.is_file() and yaml.safe_load(saved.read_text()) == wanted:
            return folder
    return None


PLACEMENT = ("data_dir", "download", "on_device", "num_workers")  # where and how data is read: free on a resume


def config_differences(saved: dict, current: dict, settings: tuple[str, ...]) -> list[str]:
    """The settings (dotted keys, at or under `settings`) that two resolved configs hold with different values: a
    class given instead of another counts once (its `class_path`), not with each of its arguments. A key only one of
    them holds (an argument added to the code since) is no difference."""
    missing = object()

    def at(config: dict, dotted: str) -> object:
        for name in dotted.split("."):
            config = config.get(name, missing) if isinstance(config, dict) else missing
        return config

    def differ(old: object, new: object, key: str) -> list[str]:
        if not (isinstance(old, dict) and isinstance(new, dict)):
            return [] if old == new else [key]
        if old.get("class_path") != new.get("class_path"):
            return [f"{key}.class_path"]
        return [found for name in old if name in new for found in differ(old[name], new[name], f"{key}.{name}")]

    pairs = [(at(saved, key), at(current, key), key) for key in settings]
    return [found for old, new, key in pairs if missing not in (old, new) for found in differ(old, new, key)]


def training_differences(saved: dict, current: dict, settings: tuple[str, ...]) -> str:
    """The `settings` two configs train with differently, listed for an error line (at most 3, then `...`): empty
    when none. Where and how the data are read (PLACEMENT) is no difference."""
    differ = [key for key in config_differences(saved, current, settings) if key.rsplit(".", 1)[-1] not in PLACEMENT]
    return ", ".join(differ[:3]) + (", ..." if len(differ) > 3 else "")


def trim_metrics(path: Path, epoch: int, step: int) -> list[str]:
    """Keep the rows of metrics.csv a checkpoint at (`epoch`, global `step`) had seen, so the resumed run appends
    after them with no epoch twice: rows of later epochs (a killed epoch's) go. Returns the file's columns."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        first = f.readline()
        f.seek(0)
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames or [], list(reader)
    ending = "\r\n" if first.endswith("\r\n") else "\n"  # Lightning's writer appends with csv's \r\n: keep it

    def seen(row: dict) -> bool:
        if row.get("epoch"):
            return int(float(row["epoch"])) <= epoch and int(row["step"]) <= step
        return int(row["step"]) <= step

    atomic_write_csv(path, header, (row for row in rows if seen(row)), lineterminator=ending)
    return header


def wandb_run_id(folder: Path | None) -> str | None:
    """The id of the W&B run a run folder logged to, if it recorded one."""
    if folder is None or not (folder / WANDB_ID).is_file():
        return None
    return (folder / WANDB_ID).read_text().strip() or None


def untrained(folder: Path) -> bool:
    """Whether a run folder holds nothing but what a run writes before it trains (no checkpoint, no metrics rows)."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    metrics = folder / "metrics.csv"
    rows = len(metrics.read_text().splitlines()) - 1 if metrics.is_file() else 0
    return names <= BOOKKEEPING and rows <= 0


def discard(folder: Path, root: Path) -> None:
    """Remove a run folder, and its parents up to `root` (runs/) while they are empty."""
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if not parent.is_dir() or any(parent.iterdir()):
            break
        parent.rmdir()
        if parent == root:
            break
