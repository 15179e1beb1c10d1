"""LightningModules that train the plain nets of `nets/`, and the framework's CLI pieces."""

from lightning_modules.classifier import (
    Classifier,
    ConfigError,
    DivergenceError,
    LossExplodedError,
    NonFiniteLossError,
)
from lightning_modules.compressed import Compressed
from lightning_modules.distillation import Student
from lightning_modules.learned_size import LearnedSize
from lightning_modules.schedules import PiecewiseLR

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
]
