"""The default loggers of a run: CSV (local, first, so the run folder is runs/<name>/version_N) and W&B.

W&B must never block or crash a run: without an API key or without a connection to its server
it logs offline into ./wandb/offline-run-*, to be uploaded later with `wandb sync`. A resumed run
continues its folder's metrics.csv and its W&B run.
"""

from __future__ import annotations

import netrc
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from lightning_modules.console import say
from lightning_modules.run_folder import trim_metrics, wandb_run_id


class ContinuedWriter(ExperimentWriter):
    """Lightning's metrics.csv writer, which keeps the rows a resumed run's checkpoint had seen (Lightning's
    own deletes the file)."""

    def __init__(self, log_dir: str, resume: tuple[int, int] | None):
        self.resume = resume
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self.resume is None or not path.is_file():
            return super()._check_log_dir_exists()
        trim_metrics(path, *self.resume)
        with path.open() as f:
            self.metrics_keys = sorted(f.readline().strip().split(","))


class RunCSVLogger(CSVLogger):
    """The CSV logger of a run: every logged row is on disk at once (a killed run loses none), and a resumed
    run (`resume` = the checkpoint's epoch and global step) continues its folder's metrics.csv."""

    def __init__(self, *args, resume: tuple[int, int] | None = None, **kwargs):
        kwargs.setdefault("flush_logs_every_n_steps", 1)  # rows are per epoch: writing each costs nothing
        super().__init__(*args, **kwargs)
        self.resume = resume

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuedWriter(self.log_dir, self.resume)
        return self._experiment


def wandb_offline_reason(timeout: float = 2.0) -> str | None:
    """Why W&B cannot log online here (None when it can, or when WANDB_MODE already decides)."""
    if os.environ.get("WANDB_MODE"):
        return "WANDB_MODE=offline" if os.environ["WANDB_MODE"] in ("offline", "dryrun") else None
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host, port = url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators(host) is not None
        except (FileNotFoundError, netrc.NetrcParseError):
            has_key = False
    if not has_key:
        return "no W&B API key"
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return f"{host} unreachable"
    return None


def _start_wandb() -> None:
    """Import W&B and start its service process; `wandb.init` later finds both ready."""
    import wandb
    import wandb.sdk.launch.inputs.internal  # noqa: F401  (imported by wandb.init; slow)

    wandb.setup()


def default_loggers(
    name: str,
    save_dir: str,
    project: str,
    wandb: bool = True,
    folder: Path | None = None,
    resume: tuple[int, int] | None = None,
) -> list[Logger]:
    """CSV logger into `save_dir/name/version_N` (or into `folder`, an existing run's), then W&B (offline when
    it has to be; the folder's own W&B run when it recorded one). `resume`: the epoch and global step of
    the checkpoint that `folder`'s run resumes from."""
    if folder is not None:  # name "" puts the version folder directly under save_dir
        csv_logger = RunCSVLogger(save_dir=str(folder.parent), name="", version=folder.name, resume=resume)
    else:
        csv_logger = RunCSVLogger(save_dir=save_dir, name=name)
    loggers: list[Logger] = [csv_logger]
    if wandb:
        reason = wandb_offline_reason()
        if reason:
            os.environ["WANDB_MODE"] = "offline"  # inherited by DDP worker processes
        # W&B's import and service start take seconds: overlap them with parsing and data loading
        threading.Thread(target=_start_wandb, name="wandb-start", daemon=True).start()
        run_id = wandb_run_id(folder)
        resumed = {"id": run_id, "resume": "allow"} if run_id else {}
        loggers.append(
            RunWandbLogger(reason, project=project, name=name, save_dir=".", offline=bool(reason), **resumed)
        )
    return loggers


class RunWandbLogger(WandbLogger):
    """Lightning's W&B logger, knowing why it logs offline (None: online) and saying where in one line."""

    def __init__(self, offline_reason: str | None, **kwargs):
        super().__init__(**kwargs)
        self._wandb_init.pop("anonymous", None)  # W&B warns about the setting whatever its value
        self.offline_reason = offline_reason
        self.resumes = "id" in kwargs

    def announce(self) -> None:
        """One line: the run (resumed or new), where it logs, and for an offline run how to upload it."""
        run = self.experiment
        state = "resumed run" if self.resumes else "run"
        if self.offline_reason:
            folder = Path(run.dir).parent
            say(f"W&B: {state} {run.id} offline ({self.offline_reason}) in {folder}; upload with `wandb sync {folder}`")
        else:
            say(f"W&B: {state} {run.id} at {run.url}")
