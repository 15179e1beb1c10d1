"""Reductions over DDP ranks in plain torch (no Lightning import), for the callbacks, layers and training parts
that count across data: one place that says whether DDP is running, and one pack-and-all-reduce.

Every function is a no-op in one process. Under DDP each is a collective: every rank must call it, with tensors
of the same shapes, whether or not it saw a sample.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed() -> bool:
    """Whether more than one process takes part in a process group (DDP, torchrun)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over ranks, in place."""
    if distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks, in place."""
    if distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_over_ranks(parts: list[torch.Tensor], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Each tensor of `parts` summed over ranks, in one collective: packed into one `dtype` tensor on the first
    part's device (float64: counts stay exact to 2^53), reduced, and split back into the parts' shapes."""
    if not parts:
        return []
    device = parts[0].device
    packed = torch.cat([part.to(device, dtype).flatten() for part in parts])
    all_reduce_sum(packed)
    return [piece.view(part.shape) for piece, part in zip(packed.split([p.numel() for p in parts]), parts, strict=True)]


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor (same shape on all ranks), stacked in rank order: (world, *shape)."""
    if not distributed():
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)
