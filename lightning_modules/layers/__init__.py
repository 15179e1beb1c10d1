"""Plain building blocks (no Lightning import): layers whose size is learned."""

from lightning_modules.layers.flexible import FlexibleLinear, soft_size, unit_scales

__all__ = ["FlexibleLinear", "soft_size", "unit_scales"]
