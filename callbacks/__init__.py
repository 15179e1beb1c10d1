"""Callbacks: observers that watch a model through hooks and report to the loggers; they never change it."""

from callbacks.activation_stats import ActivationStats
from callbacks.complexity import Complexity
from callbacks.dead_units import DeadUnits
from callbacks.sharpness import Sharpness
from callbacks.task_accuracy import TaskAccuracy
from callbacks.training_dynamics import TrainingDynamics
from callbacks.weight_spectra import WeightSpectra

__all__ = [
    "ActivationStats",
    "Complexity",
    "DeadUnits",
    "Sharpness",
    "TaskAccuracy",
    "TrainingDynamics",
    "WeightSpectra",
]
