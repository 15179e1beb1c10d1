"""LightningModules that train the plain nets of `nets/`, and the framework's CLI pieces.

The exports load on first use (PEP 562), so `from lightning_modules.layers import KWinners` or
`lightning_modules.nets` in a notebook imports neither Lightning nor torchmetrics; config class paths such as
`lightning_modules.Classifier` resolve as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

EXPORTS = {
    "Classifier": "lightning_modules.classifier",
    "Compressed": "lightning_modules.compressed",
    "Student": "lightning_modules.distillation",
    "LearnedSize": "lightning_modules.learned_size",
    "PiecewiseLR": "lightning_modules.schedules",
    "UserError": "lightning_modules.errors",
    "ConfigError": "lightning_modules.errors",
    "DivergenceError": "lightning_modules.errors",
    "LossExplodedError": "lightning_modules.errors",
    "NonFiniteLossError": "lightning_modules.errors",
}
__all__ = [
    "Classifier",
    "Compressed",
    "ConfigError",
    "DivergenceError",
    "LearnedSize",
    "LossExplodedError",
    "NonFiniteLossError",
    "PiecewiseLR",
    "Student",
    "UserError",
]

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports on demand
    from lightning_modules.classifier import Classifier
    from lightning_modules.compressed import Compressed
    from lightning_modules.distillation import Student
    from lightning_modules.errors import (
        ConfigError,
        DivergenceError,
        LossExplodedError,
        NonFiniteLossError,
        UserError,
    )
    from lightning_modules.learned_size import LearnedSize
    from lightning_modules.schedules import PiecewiseLR


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module 'lightning_modules' has no attribute {name!r}")
    value = getattr(importlib.import_module(EXPORTS[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *EXPORTS])
