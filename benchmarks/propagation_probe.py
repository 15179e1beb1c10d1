"""What the signal-propagation probe costs, against what it can save: per depth variant, the probe of `search
--bracket predicted` (3 seeds at k = 96, 32 pairs, float64) against SGD steps of the same net at k = 96 (batch 256,
float32), timed round-robin in this process so that a drift of the machine's speed hits both alike.

    python benchmarks/propagation_probe.py [--data ../shared/datasets/mnist-10k] [--rounds 3] [--steps 5]

A search trial trains 705 steps (configs/presets/original_steps.yaml); the ratio says how many trials' worth of
time the probe costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from datamodules import MNIST
from lightning_modules.run.config_files import config_name, net_from_config
from lightning_modules.studies.propagate import probe

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["tanh", "tanh_init", "elu", "elu_bn", "resnet", "tanh_bn", "resnet_nobn", "tanh_delta_orthogonal"]
TRIAL_STEPS = 705


def step_seconds(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Seconds per SGD step (forward, backward, update) at this batch, after one warm-up step."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "mnist-10k"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--depth", type=int, default=96)
    args = parser.parse_args()
    data = MNIST(data_dir=args.data, test_file_only=True, val_size=1000, test_size=1000, batch_size=256)
    data.setup("fit")
    x, y = data.eval_dataloader("train").batch(torch.arange(256))
    probes: dict[str, list[float]] = {v: [] for v in VARIANTS}
    steps: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            path = ROOT / "configs" / "depth" / f"{variant}.yaml"
            net = net_from_config(path)
            start = time.perf_counter()
            probe(config_name(path), net, data, [args.depth], [0, 1, 2], 32, torch.device("cpu"))
            probes[variant].append(time.perf_counter() - start)
            torch.manual_seed(0)
            steps[variant].append(step_seconds(net.at_depth(args.depth), x, y, args.steps))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, k = {args.depth}, {args.rounds} rounds")
    report = {}
    for variant in VARIANTS:
        probe_s, step_s = statistics.median(probes[variant]), statistics.median(steps[variant])
        report[variant] = {
            "probe_s": round(probe_s, 2),
            "step_s": round(step_s, 3),
            "trial_s": round(step_s * TRIAL_STEPS, 1),
            "probe_in_trials": round(probe_s / (step_s * TRIAL_STEPS), 4),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
