"""Checkpoints: reading a checkpoint's weights safely (`weights_only=True` always, every failure one clear
line), and a `last.ckpt` that is the last epoch's."""

from __future__ import annotations

from pathlib import Path

import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from lightning_modules.classifier import ConfigError


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint of this framework (or a plain saved state dict), loaded as weights only."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or truncated file, or one that would need unpickling arbitrary objects
        raise ConfigError(f"{what} {path} cannot be read as weights: {str(e).splitlines()[0][:200]}") from e
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{what} {path} holds no state dict")
    return state


def load_net(net: nn.Module, path: str | Path, what: str = "checkpoint") -> None:
    """Load a net's weights from a checkpoint: its `net.*` entries, or a state dict of the net itself."""
    state = read_state_dict(path, what)
    if any(key.startswith("net.") for key in state):
        state = {key.removeprefix("net."): value for key, value in state.items() if key.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise ConfigError(f"{what} {path} does not fit the configured net: {detail}") from e


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt`, rewritten at the end of every epoch. (Lightning's own `save_last` rewrites it only when a
    best-k checkpoint is saved too, so its `last.ckpt` would be the best epoch's, not the last's.)"""

    def __init__(self, dirpath: str | None = None):
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)


def keep_last_epoch(callbacks: list) -> None:
    """Turn each best-k ModelCheckpoint's `save_last` into a LastCheckpoint beside it (same folder)."""
    for callback in list(callbacks):
        if type(callback) is ModelCheckpoint and callback.save_last is True:
            callback.save_last = False
            callbacks.append(LastCheckpoint(callback.dirpath))
