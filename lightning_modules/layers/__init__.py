"""Plain building blocks (no Lightning import): layers whose size is learned."""

from lightning_modules.layers.flexible import FlexibleLinear, soft_size, unit_scales
from lightning_modules.layers.sparsifier import SparsifierLinear

__all__ = ["FlexibleLinear", "SparsifierLinear", "soft_size", "unit_scales"]
