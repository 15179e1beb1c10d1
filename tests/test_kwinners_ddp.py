"""k-winners under DDP (2 CPU processes, gloo): duty cycles come from the global batch's wins, so both ranks
hold the same buffers and they equal one process's over the same global batches."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_modules.layers import KWinners, KWinners2d
from tests.conftest import start_ranks

STEPS, GLOBAL_BATCH = 6, 8


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        KWinners2d(4, percent_on=0.3, boost_strength=1.5, duty_cycle_period=20),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 20),
        KWinners(20, percent_on=0.2, boost_strength=1.5, duty_cycle_period=20),
        nn.Linear(20, 3),
    )


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=generator),
            torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def train(net: nn.Module, batches, rank: int = 0, world: int = 1) -> None:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for x, y in batches:
        share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x[share]), y[share]).backward()
        optimizer.step()


def buffers(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in net.named_buffers()}


def rank_main(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        net = nn.parallel.DistributedDataParallel(small_net())  # broadcast_buffers=True, the default
        train(net, global_batches(), rank, world)
        torch.save(buffers(net.module), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.subprocess
def test_duty_cycles_equal_one_process_over_the_global_batches(tmp_path):
    start_ranks(rank_main, (2, str(tmp_path)))
    single = small_net()
    train(single, global_batches())
    expected = buffers(single)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert expected["1.samples_seen"].item() == STEPS * GLOBAL_BATCH
    for name, value in expected.items():
        for r, got in enumerate(ranks):
            assert torch.allclose(got[name], value, atol=1e-6), (name, r, got[name], value)
    assert (expected["4.duty_cycle"] > 0).sum() > 4  # several units won: the comparison is not of zeros
