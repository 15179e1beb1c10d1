"""Plain building blocks (no Lightning import): layers whose size is learned, and cheap conv substitutes."""

from lightning_modules.layers.flexible import FlexibleLinear, soft_size, unit_scales
from lightning_modules.layers.sparsifier import SparsifierLinear
from lightning_modules.layers.substitutes import substitute_conv

__all__ = ["FlexibleLinear", "SparsifierLinear", "soft_size", "substitute_conv", "unit_scales"]
