"""Training-step time of WRN students per conv substitute, and what activation checkpointing costs.

One SGD step (forward, backward, update) of WRN-`depth`-`width` on a batch of random 3x32x32 images,
in train mode, channels_last, on the GPU when there is one (else the CPU); the median of `--steps`
steps after 3 warm-up steps. Each substitute once plain and once with `checkpoint_blocks`, so the
last column is the extra time a step pays for the memory checkpointing saves.

    python benchmarks/substitute_steps.py [--depth 16 --width 2 --batch 64 --steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.counting import count  # noqa: E402
from lightning_modules.nets import WideResNet  # noqa: E402

SUBSTITUTES = ["Conv", "Sep", "Generic_0.25", "Shuffle_4", "SepHashed_0.1", "ACDC_12", "TensorTrain_0.25", "CP_0.1"]


def step_time(net: torch.nn.Module, batch: int, steps: int, device: torch.device) -> float:
    net = net.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    times = []
    for i in range(steps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"WRN-{args.depth}-{args.width}, batch {args.batch}, {device}, torch {torch.__version__}\n")
    print("| conv | params | mult-adds | step (ms) | checkpointed step (ms) | extra |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for conv in SUBSTITUTES:
        torch.manual_seed(0)
        net = WideResNet(args.depth, args.width, conv=conv)
        counted = count(net, (3, 32, 32))
        plain = step_time(net, args.batch, args.steps, device)
        torch.manual_seed(0)
        checkpointed = step_time(
            WideResNet(args.depth, args.width, conv=conv, checkpoint_blocks=True), args.batch, args.steps, device
        )
        print(
            f"| {conv} | {counted.params:,} | {counted.mult_adds:.3E} | {plain * 1e3:.1f} | "
            f"{checkpointed * 1e3:.1f} | {checkpointed / plain - 1:+.0%} |"
        )


if __name__ == "__main__":
    main()
