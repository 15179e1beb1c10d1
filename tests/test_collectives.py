"""The one place that reduces over DDP ranks (lightning_modules/collectives.py): under 2 CPU processes (gloo) every
rank gets the sums, shapes and maxima of all ranks; in one process each call returns its input."""

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightning_modules.collectives import all_gather_rows, all_reduce_max, distributed, sum_over_ranks, world_size
from tests.conftest import start_ranks

ROOT = Path(__file__).resolve().parents[1]


def rank_main(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        matrix, count = sum_over_ranks([torch.full((2, 3), float(rank + 1)), torch.tensor(float(10 * rank))])
        peak = all_reduce_max(torch.tensor([float(rank), -float(rank)]))
        rows = all_gather_rows(torch.tensor([rank, 7]))
        torch.save({"matrix": matrix, "count": count, "peak": peak, "rows": rows, "world": world_size()},
                   Path(folder) / f"rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.subprocess
def test_two_ranks_receive_the_sums_maxima_and_rows_of_both(tmp_path):
    start_ranks(rank_main, (2, str(tmp_path)))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["world"] == 2
        assert got["matrix"].shape == (2, 3) and torch.equal(
            got["matrix"], torch.full((2, 3), 3.0, dtype=torch.float64)
        )
        assert got["count"].shape == () and got["count"].item() == 10.0
        assert got["peak"].tolist() == [1.0, 0.0]
        assert got["rows"].tolist() == [[0, 7], [1, 7]]


def test_one_process_returns_its_input():
    assert not distributed() and world_size() == 1
    a, b = sum_over_ranks([torch.arange(4.0).view(2, 2), torch.tensor([5])])
    assert a.tolist() == [[0.0, 1.0], [2.0, 3.0]] and b.tolist() == [5.0]
    assert all_gather_rows(torch.tensor([1, 2])).tolist() == [[1, 2]]


def test_no_other_module_asks_whether_ddp_runs_or_reduces_itself():
    """Every reduction over ranks goes through collectives.py (one answer to "is DDP running")."""
    offenders = []
    for path in [*ROOT.glob("lightning_modules/**/*.py"), *ROOT.glob("callbacks/*.py"), *ROOT.glob("datamodules/*.py")]:
        if path.name == "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("all_reduce", "all_gather", "get_world_size"):
                if isinstance(node.value, ast.Name) and node.value.id == "dist":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} dist.{node.attr}")
    assert offenders == []
