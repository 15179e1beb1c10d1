"""The plasticity study's seed stack against its loop (spec 07): the wall time of one intervention's seeds over a
task stream, trained one after another through Lightning (`--stack_seeds false`) or as one vmapped stack (the
default), each with its per-task measures. Rounds run the two round-robin; the ratio is per round.

The MLP of configs/plasticity/permuted_digits.yaml (784-256-10, SGD lr 0.01 momentum 0.9, batch 64) on a stream of
permuted-pixel tasks of the embedded digits, or with --mnist of the MNIST 10k split (8,000 training images, as
configs/plasticity/permuted_mnist.yaml).

    python benchmarks/plasticity_stack.py [--seeds 3] [--tasks 10] [--steps_per_task 100] [--rounds 3]
        [--intervention '{}'] [--mnist path/to/mnist-10k]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules import MNIST, Digits, TaskStream  # noqa: E402
from lightning_modules import Classifier  # noqa: E402
from lightning_modules.nets import MLP  # noqa: E402
from lightning_modules.studies.plasticity import StreamTrial  # noqa: E402
from lightning_modules.studies.stream_stack import StackedStreamTrial  # noqa: E402
from lightning_modules.studies.trials import quiet_lightning  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--steps_per_task", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--intervention", default="{}", help="the Classifier's plasticity settings, YAML")
    parser.add_argument("--mnist", help="the MNIST 10k folder (default: the embedded digits)")
    args = parser.parse_args()
    settings = yaml.safe_load(args.intervention) or {}
    base = (MNIST(data_dir=args.mnist, download=False, test_file_only=True, val_size=1000, test_size=1000,
                  batch_size=64) if args.mnist else Digits(batch_size=64))  # fmt: skip
    stream = TaskStream(base, "permuted_inputs", tasks=args.tasks, steps_per_task=args.steps_per_task)
    stream.setup()
    model = Classifier(MLP(width=256), optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9))
    seeds = list(range(args.seeds))
    trials = {
        "loop": lambda: [StreamTrial(model, stream, device="cpu")("bench", settings, seed) for seed in seeds],
        "stack": lambda: StackedStreamTrial(model, stream, device="cpu")("bench", settings, seeds),
    }
    times: dict[str, list[float]] = {mode: [] for mode in trials}
    for _ in range(args.rounds):
        for mode, trial in trials.items():
            start = time.perf_counter()
            with quiet_lightning():
                trial()
            times[mode].append(time.perf_counter() - start)
    ratios = [s / lp for s, lp in zip(times["stack"], times["loop"], strict=True)]
    print(json.dumps({
        "seeds": args.seeds, "steps": args.tasks * args.steps_per_task, "data": "mnist-10k" if args.mnist else "digits",
        **{f"{m}_s": [round(t, 2) for t in v] for m, v in times.items()},
        "stack/loop per round": [round(r, 3) for r in ratios], "stack/loop median": round(statistics.median(ratios), 3),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
