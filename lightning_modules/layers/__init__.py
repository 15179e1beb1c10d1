"""Plain building blocks (no Lightning import): layers whose size is learned, cheap conv substitutes,
k-winners activations, fixed sparse weights, and the attention-transfer loss between two nets."""

from lightning_modules.layers.attention_transfer import AttentionTransfer, attention_loss, attention_map
from lightning_modules.layers.flexible import FlexibleLinear, soft_size, unit_scales
from lightning_modules.layers.kwinners import KWinners, KWinners2d, KWinnersBase
from lightning_modules.layers.sparse_weights import SparseWeights, rezero_weights
from lightning_modules.layers.sparsifier import SparsifierLinear
from lightning_modules.layers.substitutes import substitute_conv

__all__ = [
    "AttentionTransfer",
    "attention_loss",
    "attention_map",
    "KWinners",
    "KWinners2d",
    "KWinnersBase",
    "SparseWeights",
    "rezero_weights",
    "FlexibleLinear",
    "SparsifierLinear",
    "soft_size",
    "substitute_conv",
    "unit_scales",
]
