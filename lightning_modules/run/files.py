"""Result files written atomically: through a temporary file in the same folder and a rename, so a kill
never leaves half a file (the old one stays whole until the new one is complete)."""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write instead of `path`; renamed onto `path` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # the suffix keeps savefig's format
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def atomic_write_csv(path: str | Path, fieldnames: list[str], rows: Iterable[dict], lineterminator: str = "\n") -> None:
    """A CSV file with a header and one row per dict, written atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fieldnames, lineterminator=lineterminator)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())


def atomic_save(obj: object, path: str | Path) -> None:
    """`torch.save` atomically."""
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


def atomic_savefig(figure, path: str | Path, **kwargs) -> None:
    """A matplotlib figure's `savefig`, atomically (the temporary file keeps the suffix: the path's format)."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, **kwargs)
