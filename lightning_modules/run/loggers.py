"""The default loggers of a run: CSV (local, first, so the run folder is runs/<name>/version_N) and W&B.

W&B must never block or crash a run: without an API key or without a connection to its server
it logs offline into ./wandb/offline-run-*, to be uploaded later with `wandb sync`. A resumed run
continues its folder's metrics.csv and its W&B run.
"""

from __future__ import annotations

import netrc
import os
import shutil
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from lightning_modules.run.console import say
from lightning_modules.run.run_folder import WANDB_ID, trim_metrics

if TYPE_CHECKING:
    from lightning_modules.run.run_state import Run


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
        self.metrics_keys = sorted(trim_metrics(path, *self.resume))


class RunCSVLogger(CSVLogger):
    """The CSV logger of a run: every logged row is on disk at once (a killed run loses none), and a resumed
    run (`resume` = the checkpoint's epoch and global step) continues its folder's metrics.csv."""

    def __init__(self, *args, resume: tuple[int, int] | None = None, **kwargs):
        kwargs.setdefault("flush_logs_every_n_steps", 1)  # appends only the new rows: a few per epoch here
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


def default_loggers(
    run: Run, project: str, wandb: bool = True, resume: tuple[int, int] | None = None, study: bool = False
) -> list[Logger]:
    """CSV logger into `run.root/run.name/version_N` (or into the folder the run continues), then W&B (offline when
    it has to be) under the run's W&B id. `resume`: the epoch and global step of the checkpoint the continued
    folder's metrics go on after. A `study`'s run opens a W&B group for its trials' runs."""
    if run.folder is not None:  # name "" puts the version folder directly under save_dir
        csv_logger = RunCSVLogger(save_dir=str(run.folder.parent), name="", version=run.folder.name, resume=resume)
    else:
        csv_logger = RunCSVLogger(save_dir=str(run.root), name=run.name)
    loggers: list[Logger] = [csv_logger]
    if wandb:
        reason = wandb_offline_reason()
        if reason:
            os.environ["WANDB_MODE"] = "offline"  # inherited by DDP worker processes
        grouped = {"group": f"{run.name}-{run.wandb_id}", "job_type": "study"} if study else {}
        where = str(Path.cwd())  # absolute: W&B resolves "." against the first run's directory in a process
        loggers.append(
            RunWandbLogger(
                reason, resumes=run.resumes_wandb, id=run.wandb_id, project=project, name=run.name, save_dir=where,
                **grouped,
            )
        )  # fmt: skip
    return loggers


def start_wandb(loggers: list[Logger], folder: Path | None) -> None:
    """Start the run's W&B run once the run can go ahead (a fit: its data set up; a study: its settings checked, its
    data read, its first trial or table due): its id recorded in the run folder (a resume continues it), one line
    saying where it logs, the start on a background thread. A run refused before this has no W&B run to delete."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger) or isinstance(logger, RunWandbLogger) and logger.started:
            continue
        if folder is not None:
            (folder / WANDB_ID).write_text(str(logger.version))
        if isinstance(logger, RunWandbLogger):
            logger.announce()
            logger.start()


class PendingRun:
    """The W&B run while it starts on a background thread: any use of it waits until it has started."""

    def __init__(self, logger: RunWandbLogger):
        self._logger = logger

    def __getattr__(self, name: str):
        return getattr(self._logger.wait(), name)


class RunWandbLogger(WandbLogger):
    """Lightning's W&B logger, started only once the run can train (`start`, by the run's RunConfig after the
    data is set up), on a background thread that overlaps W&B's seconds of start-up with the run's first
    steps; its run id is known from the start, and it says where it logs in one line."""

    def __init__(self, offline_reason: str | None, resumes: bool = False, **kwargs):
        super().__init__(offline=bool(offline_reason), **kwargs)
        self._wandb_init.pop("anonymous", None)  # W&B warns about the setting whatever its value
        self.offline_reason, self.resumes = offline_reason, resumes
        self._starting: Future | None = None
        self._pending_params: list = []

    @property
    @rank_zero_experiment
    def experiment(self):
        """The W&B run; until it has started, a stand-in that waits for it when it is used."""
        return self._experiment if self._experiment is not None else PendingRun(self)

    def start(self) -> None:
        """Start the W&B run on a background thread (once)."""
        if self._starting is None and self._experiment is None:
            self._starting = ThreadPoolExecutor(1, thread_name_prefix="wandb-start").submit(self._start)

    def _start(self):
        import wandb

        # always a run of its own: with a run this process left open (a notebook's earlier run) Lightning would log
        # into wandb.run, and wandb.init would return that run, or the newest open one when wandb.run is None
        offline = {"mode": "offline"} if self.offline_reason else {}
        run = self._experiment = wandb.init(**{**self._wandb_init, **offline}, reinit="create_new")
        run.define_metric("trainer/global_step")  # Lightning's x-axis, as its own init defines it
        run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        if not self.offline_reason:
            say(f"W&B: {'resumed run' if self.resumes else 'run'} {run.id} at {run.url}")
        return run

    def wait(self):
        """The started W&B run (starting it now if nothing did), with the hyperparameters logged meanwhile."""
        self.start()
        run = self._starting.result() if self._starting is not None else self._experiment
        params, self._pending_params = self._pending_params, []
        for p in params:
            super().log_hyperparams(p)
        return run

    @property
    def started(self) -> bool:
        return self._starting is not None or self._experiment is not None

    def log_hyperparams(self, params) -> None:
        if self._experiment is None:  # not started yet: sent once it has
            self._pending_params.append(params)
        else:
            super().log_hyperparams(params)

    def finalize(self, status: str) -> None:
        if self.started:
            self.wait()
        super().finalize(status)

    def discard(self) -> None:
        """Finish and remove this run's W&B run, started for a run that failed before it trained: an offline run's
        folder is deleted; an online one on the server when it can be reached (else it stays, marked failed)."""
        if not self.started:
            return
        run = self.wait()
        folder = Path(run.dir).parent
        run.finish(exit_code=1)
        if run.settings.mode in ("offline", "dryrun"):
            shutil.rmtree(folder, ignore_errors=True)
            for link in folder.parent.iterdir():  # latest-run, debug.log, ...: W&B's links into the removed run
                if link.is_symlink() and not link.exists():
                    link.unlink()
            if not any(folder.parent.iterdir()):
                folder.parent.rmdir()
            return
        try:
            import wandb

            wandb.Api().run(f"{run.entity}/{run.project}/{run.id}").delete()
        except Exception:  # noqa: BLE001 (best effort: the run stays, marked failed)
            pass

    def announce(self) -> None:
        """One line: the run (resumed or new) and where it logs; an online run's link follows once it has started."""
        if self.offline_reason:
            folder = f"wandb/offline-run-*-{self.version}"
            state = "resumed run" if self.resumes else "run"
            say(
                f"W&B: {state} {self.version} offline ({self.offline_reason}) in {folder}; upload with `wandb sync {folder}`"
            )
