"""Checkpoints: reading a checkpoint's weights safely (`weights_only=True` always, every failure one clear
line), and a `last.ckpt` that is the last epoch's."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from lightning_modules.errors import ConfigError


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """A checkpoint file loaded as weights only (tensors and plain values); every failure one ConfigError line,
    in this project's words (torch's own message for a pickled file advises unpickling it: never repeated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a class or function the file would construct
            raise ConfigError(
                f"{what} {path} holds Python objects besides tensors and plain values; this project loads weights only"
            ) from e
        raise ConfigError(f"{what} {path} is not a PyTorch checkpoint (or it is corrupt)") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConfigError(f"{what} {path} is truncated, corrupt or not a PyTorch checkpoint") from e
    except Exception as e:  # noqa: BLE001 (a text file read as a pickle fails as KeyError, IndexError, ...)
        raise ConfigError(f"{what} {path} is not a PyTorch checkpoint (or it is corrupt)") from e
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"{what} {path} holds no state dict")
    return checkpoint


def check_version(checkpoint: dict, path: str | Path, what: str = "checkpoint") -> None:
    """Refuse a checkpoint written by a newer Lightning (major.minor) than this environment's: its format may
    hold what this version cannot restore."""
    written = str(checkpoint.get("pytorch-lightning_version", ""))
    if not written:
        return

    def release(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", version)[:2])

    if release(written) > release(pl.__version__):
        raise ConfigError(
            f"{what} {Path(path)} was written by PyTorch Lightning {written}, newer than this environment's "
            f"{pl.__version__}: upgrade pytorch-lightning to resume it"
        )


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint of this framework (or a plain saved state dict), loaded as weights only."""
    return state_dict_of(read_checkpoint(path, what), path, what)


def state_dict_of(checkpoint: dict, path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint (or the checkpoint itself, when it is a plain state dict)."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{what} {Path(path)} holds no state dict")
    return state


def check_fits(model: nn.Module, saved_keys: set[str], path: str | Path) -> None:
    """Refuse, in one line naming a few keys, a checkpoint (at `path`, holding `saved_keys`) whose net weights
    (`net.*`) are not those of `model`'s net: a checkpoint of another net. Shapes are not compared: a pruned
    net's checkpoint is smaller by design."""
    state = {key for key in saved_keys if key.startswith("net.")}
    expected = {key for key in model.state_dict() if key.startswith("net.")}  # a student's teacher is not saved

    def few(keys: list[str]) -> str:
        return f"{len(keys)} {{}} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"

    missing, unexpected = sorted(expected - state), sorted(state - expected)
    parts = [few(keys).format(kind) for keys, kind in ((missing, "missing"), (unexpected, "unexpected")) if keys]
    if parts:
        raise ConfigError(f"checkpoint {Path(path)} is not of this config's model: weights {'; '.join(parts)}")


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
