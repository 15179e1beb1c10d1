"""Callbacks: observers that watch a model through hooks and report to the loggers (and attention
transfer, which watches a student and its teacher through hooks for the student's loss)."""

from callbacks.activation_stats import ActivationStats
from callbacks.attention_transfer import AttentionTransfer
from callbacks.complexity import Complexity
from callbacks.dead_units import DeadUnits

__all__ = ["ActivationStats", "AttentionTransfer", "Complexity", "DeadUnits"]
