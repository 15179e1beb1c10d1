"""LightningModules that train the plain nets of `nets/`, and the framework's CLI pieces."""

from lightning_modules.classifier import Classifier, NonFiniteLossError
from lightning_modules.schedules import PiecewiseLR

__all__ = ["Classifier", "NonFiniteLossError", "PiecewiseLR"]
