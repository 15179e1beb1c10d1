"""The seeds of one search probe trained together against one after another, for the deep depth nets.

A probe of `search --seeds S` trains S nets of one depth. Three ways to train them, timed on the same steps:
  sequential  one net after another in this process, with all of its torch threads (`--launcher local`)
  processes   the S trials in parallel processes of one torch thread each, as many at once as there are cores
              (what `--launcher ray --cpus_per_trial 1` does, without Ray's start-up)
  grouped     the S nets as one: every conv grouped by member (S x the channels, groups = S), batch norm per
              channel (so per member), each member's own batch as its own input channel, the heads batched;
              one loss, the members' summed, whose gradient is each member's own
The grouped net is built here only to measure it; a member's losses are checked against its own net's.

    python benchmarks/stacked_trials.py [--variants elu tanh_bn elu_bn] [--seeds 3] [--steps 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_modules.nets.depth_cnn import DepthBlock, DepthCNN  # noqa: E402
from lightning_modules.run.config_files import net_from_config  # noqa: E402

BATCH = 256


@functools.cache
def settings(variant: str) -> dict:
    """The DepthCNN settings of a variant's config (read once: reading builds a net, which no timing should hold)."""
    return net_from_config(ROOT / "configs" / "depth" / f"{variant}.yaml").settings


def batches(seed: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A member's own batches (random images: the step's cost does not depend on them)."""
    generator = torch.Generator().manual_seed(1000 + seed)
    return [(torch.randn(BATCH, 1, 28, 28, generator=generator), torch.randint(0, 10, (BATCH,), generator=generator))
            for _ in range(steps)]  # fmt: skip


def own_net(variant: str, seed: int) -> DepthCNN:
    """The variant's net drawn from `seed` alone (its settings read first: reading builds a net)."""
    args = settings(variant)
    torch.manual_seed(seed)
    return DepthCNN(**args)


def train(net: nn.Module, data: list, members: int = 1) -> list[float]:
    """SGD (lr 0.01, momentum 0.9) over `data`, channels-last; the losses (per member for a grouped net)."""
    net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for x, y in data:
        optimizer.zero_grad()
        logits = net(x.contiguous(memory_format=torch.channels_last))
        if members == 1:
            loss = F.cross_entropy(logits, y)
            losses.append(loss.detach())
        else:  # (B, S, 10) against (B, S): each member's mean loss, summed
            each = F.cross_entropy(logits.permute(0, 2, 1), y, reduction="none").mean(0)
            loss = each.sum()
            losses.append(each.detach())
        loss.backward()
        optimizer.step()
    return [v.tolist() for v in losses]


class Grouped(nn.Module):
    """S DepthCNNs of one architecture as one net: member s's channels are the s-th block of every layer's."""

    def __init__(self, nets: list[DepthCNN]):
        super().__init__()
        s = len(nets)
        layers = []
        for parts in zip(*(net.features for net in nets), strict=True):
            if isinstance(parts[0], DepthBlock):
                conv = parts[0].conv
                grouped = nn.Conv2d(conv.in_channels * s, conv.out_channels * s, 3, padding=1, groups=s)
                grouped.weight.data.copy_(torch.cat([p.conv.weight.data for p in parts]))
                grouped.bias.data.copy_(torch.cat([p.conv.bias.data for p in parts]))
                block = DepthBlock(conv.in_channels * s, conv.out_channels * s, nets[0].settings["activation"],
                                   nets[0].settings["batch_norm"], parts[0].residual)  # fmt: skip
                block.conv = grouped
                layers.append(block)
            else:
                layers.append(parts[0])
        self.features = nn.Sequential(*layers)
        self.weight = nn.Parameter(torch.stack([net.head.weight.data.t() for net in nets]))  # (S, in, 10)
        self.bias = nn.Parameter(torch.stack([net.head.bias.data for net in nets]))
        self.members = s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features(x)  # (B, S*C, h, w)
        rows = maps.reshape(len(x), self.members, -1)  # member s's C*h*w features, as its own net flattens them
        return torch.einsum("bsi,sio->bso", rows, self.weight) + self.bias


def sequential(variant: str, seeds: int, steps: int) -> float:
    start = time.perf_counter()
    for seed in range(seeds):
        train(own_net(variant, seed), batches(seed, steps))
    return time.perf_counter() - start


def _one_thread_trial(args: tuple[str, int, int]) -> None:
    torch.set_num_threads(1)
    variant, seed, steps = args
    train(own_net(variant, seed), batches(seed, steps))


def processes(variant: str, seeds: int, steps: int) -> float:
    context = multiprocessing.get_context("forkserver")
    with context.Pool(os.cpu_count()) as pool:
        pool.map(_one_thread_trial, [(variant, 0, 1)] * os.cpu_count())  # workers up and imported, untimed
        start = time.perf_counter()
        pool.map(_one_thread_trial, [(variant, seed, steps) for seed in range(seeds)])
        return time.perf_counter() - start


def grouped_data(seeds: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    own = [batches(seed, steps) for seed in range(seeds)]
    return [(torch.cat([o[i][0] for o in own], dim=1), torch.stack([o[i][1] for o in own], dim=1))
            for i in range(steps)]  # fmt: skip


def grouped(variant: str, seeds: int, steps: int) -> float:
    net = Grouped([own_net(variant, seed) for seed in range(seeds)])
    data = grouped_data(seeds, steps)
    start = time.perf_counter()
    train(net, data, members=seeds)
    return time.perf_counter() - start


def members_match(variant: str, seeds: int, steps: int = 5, depth: int = 9) -> float:
    """The largest relative difference between a grouped member's losses and its own net's, at a shallow depth
    (deep nets amplify any rounding difference from step to step, grouped or not: tests/test_cpu_fast.py)."""

    args = {**settings(variant), "depth": depth}

    def net(seed: int) -> DepthCNN:
        torch.manual_seed(seed)
        return DepthCNN(**args)

    together = train(Grouped([net(seed) for seed in range(seeds)]), grouped_data(seeds, steps), seeds)
    worst = 0.0
    for seed in range(seeds):
        alone = train(net(seed), batches(seed, steps))
        worst = max(worst, max(abs(t[seed] - a) / a for t, a in zip(together, alone, strict=True)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["elu", "tanh_bn", "elu_bn"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    modes = {"sequential": sequential, "processes": processes, "grouped": grouped}
    report = {}
    for variant in args.variants:
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode, run in modes.items():
                times[mode].append(run(variant, args.seeds, args.steps))
        median = {m: statistics.median(t) for m, t in times.items()}
        report[variant] = {
            "depth": settings(variant)["depth"],
            **{f"{m}_s": round(v, 2) for m, v in median.items()},
            **{f"{m}/sequential": round(v / median["sequential"], 2) for m, v in median.items() if m != "sequential"},
            "grouped member vs own net at k = 9, max relative loss difference": f"{members_match(variant, args.seeds):.1e}",
        }
        print(json.dumps({variant: report[variant]}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
