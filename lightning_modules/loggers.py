"""The default loggers of a run: CSV (local, first, so the run folder is runs/<name>/version_N) and W&B.

W&B must never block or crash a run: without an API key or without a connection to its server
it logs offline into ./wandb/offline-run-*, to be uploaded later with `wandb sync`.
"""

from __future__ import annotations

import netrc
import os
import socket
import threading
from urllib.parse import urlparse

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_info


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


def default_loggers(name: str, save_dir: str, project: str, wandb: bool = True) -> list[Logger]:
    """CSV logger into `save_dir/name/version_N`, then W&B (offline when it has to be)."""
    loggers: list[Logger] = [CSVLogger(save_dir=save_dir, name=name)]
    if wandb:
        reason = wandb_offline_reason()
        if reason:
            os.environ["WANDB_MODE"] = "offline"  # inherited by DDP worker processes
            rank_zero_info(
                f"W&B: logging offline ({reason}) to ./wandb/offline-run-*; upload later with `wandb sync <that folder>`"
            )
        # W&B's import and service start take seconds: overlap them with parsing and data loading
        threading.Thread(target=_start_wandb, name="wandb-start", daemon=True).start()
        loggers.append(WandbLogger(project=project, name=name, save_dir=".", offline=bool(reason)))
    return loggers
