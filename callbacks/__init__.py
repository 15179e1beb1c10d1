"""Callbacks: observers that watch a model through hooks and report to the loggers."""

from callbacks.complexity import Complexity

__all__ = ["Complexity"]
