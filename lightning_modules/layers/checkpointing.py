"""Activation checkpointing for a block that holds batch norm: recompute in backward, count each batch once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextmanager
def batch_stats_kept(module: nn.Module) -> Iterator[None]:
    """Restore the batch-norm running statistics of `module` on exit: a recomputed forward must not count
    its batch twice."""
    saved = [
        (b, b.clone()) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _contexts(module: nn.Module) -> tuple:
    return nullcontext(), batch_stats_kept(module)


def run_checkpointed(
    module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """`forward(x)` keeping only `x` for the backward pass, which recomputes the rest (random state replayed,
    so dropout draws the same masks); the same gradients as a plain call, less memory, more time."""
    return checkpoint(forward, x, use_reentrant=False, context_fn=partial(_contexts, module))


class CheckpointableBlock(nn.Module):
    """A block whose `body` runs checkpointed (see `run_checkpointed`) when `checkpointed` is set and
    gradients are on, and plainly otherwise."""

    checkpointed: bool = False

    def body(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed and torch.is_grad_enabled():
            return run_checkpointed(self, self.body, x)
        return self.body(x)
