"""One training step of the deep depth-series nets, as their configs build them, in three ways.

A step is what a search trial repeats 705 times: SGD (lr 0.01, momentum 0.9) on a batch of 256 MNIST-sized
images, forward, backward and update, through the Classifier with its default channels-last memory order.

    python benchmarks/depth_step.py [--variants elu tanh_bn elu_bn resnet] [--steps 3] [--rounds 2] [--compile]

Modes, run round-robin per variant (so a drift of a shared machine's speed hits each alike):
  stock     PyTorch's nn.ELU and nn.BatchNorm2d (what the nets used before layers.cpu_fast)
  fast      the nets as built now: layers.cpu_fast's ELU (exp, not expm1) and batch norm (NCHW at <= 8 channels)
  compiled  fast, with every block compiled (torch.compile, one graph per block shape, cached across blocks);
            only with --compile; its first step, which compiles, is reported apart
Prints each mode's median step in seconds and its ratio to stock, as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_modules.layers.cpu_fast import with_pytorch_modules  # noqa: E402
from lightning_modules.nets.depth_cnn import DepthBlock, DepthCNN  # noqa: E402
from lightning_modules.run.config_files import net_from_config  # noqa: E402


def net_of(variant: str) -> DepthCNN:
    """The variant's net at its config's depth, seeded as `fit --seed_everything 0` seeds it."""
    torch.manual_seed(0)
    return net_from_config(ROOT / "configs" / "depth" / f"{variant}.yaml")


def prepared(variant: str, mode: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    net = net_of(variant)
    if mode == "stock":
        net = with_pytorch_modules(net)
    if mode == "compiled":
        for block in net.modules():
            if isinstance(block, DepthBlock):
                block.compile()
    net = net.to(memory_format=torch.channels_last)
    return net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)


def step(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    F.cross_entropy(net(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["elu", "tanh_bn", "elu_bn", "resnet"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode and round, after one untimed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time the compiled blocks")
    args = parser.parse_args()
    modes = ["stock", "fast", *(["compiled"] if args.compile else [])]
    x = torch.randn(256, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(1))
    report = {}
    for variant in args.variants:
        times: dict[str, list[float]] = {m: [] for m in modes}
        first: dict[str, float] = {}
        for _ in range(args.rounds):
            for mode in modes:
                net, optimizer = prepared(variant, mode)
                first.setdefault(mode, step(net, optimizer, x, y))  # the compiled mode compiles here
                times[mode] += [step(net, optimizer, x, y) for _ in range(args.steps)]
        median = {m: statistics.median(t) for m, t in times.items()}
        report[variant] = {
            "depth": net_of(variant).settings["depth"],
            **{f"{m}_s": round(median[m], 3) for m in modes},
            **{f"{m}/stock": round(median[m] / median["stock"], 2) for m in modes if m != "stock"},
            **({"compiled_first_step_s": round(first["compiled"], 1)} if "compiled" in first else {}),
        }
        print(json.dumps({variant: report[variant]}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
