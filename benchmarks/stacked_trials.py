"""The seeds of one search probe trained together against one after another, for the deep depth nets.

A probe of `search --seeds S` trains S nets of one depth. Three ways to train them, timed on the same steps:
  sequential  one net after another in this process, with all of its torch threads (`--launcher local`)
  processes   the S trials in parallel processes of one torch thread each, as many at once as there are cores
              (what `--launcher ray --cpus_per_trial 1` does, without Ray's start-up)
  grouped     the S nets as one: every conv grouped by member (S x the channels, groups = S), batch norm per
              channel (so per member), each member's own batch as its own input channel, the heads batched;
              one loss, the members' summed, whose gradient is each member's own
The grouped net is the search's (`nets.GroupedDepthCNN`); a member's losses are checked against its own net's.

With `--data` (the MNIST 10k folder) it also times a probe of the search itself, the way `search` trains it: the
seeds' trials one after another (`DepthTrial`, a Lightning fit each, with its evaluation of the training and
validation splits) against the same seeds grouped (`DepthTrial.group`), at two step counts; their difference is
the cost per step, from which a 705-step probe (configs/presets/original_steps.yaml) is projected.

    python benchmarks/stacked_trials.py [--variants elu tanh_bn elu_bn] [--seeds 3] [--steps 20] [--rounds 2]
        [--data path/to/mnist-10k --probe_steps 4 12]
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

from lightning_modules.nets.depth_cnn import DepthCNN  # noqa: E402
from lightning_modules.nets.grouped_depth_cnn import GroupedDepthCNN  # noqa: E402
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
    net = GroupedDepthCNN([own_net(variant, seed) for seed in range(seeds)])
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

    together = train(GroupedDepthCNN([net(seed) for seed in range(seeds)]), grouped_data(seeds, steps), seeds)
    worst = 0.0
    for seed in range(seeds):
        alone = train(net(seed), batches(seed, steps))
        worst = max(worst, max(abs(t[seed] - a) / a for t, a in zip(together, alone, strict=True)))
    return worst


def search_probe(variant: str, seeds: int, steps: int, data_dir: str) -> dict[str, float]:
    """Seconds of one probe of `seeds` seeds at the config's depth, `steps` steps a trial, on the 10k split: trained
    as the search trains it one seed at a time, and grouped."""
    from datamodules import MNIST
    from lightning_modules import Classifier
    from lightning_modules.studies.search import DepthTrial

    data = MNIST(data_dir=data_dir, test_file_only=True, val_size=1000, test_size=1000, batch_size=BATCH)
    data.setup("fit")
    net = own_net(variant, 0)
    template = Classifier(net, optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9))
    trial = DepthTrial({variant: net}, template, data, epochs=1, steps=steps)
    depth, times = settings(variant)["depth"], {}
    start = time.perf_counter()
    for seed in range(seeds):
        trial(variant, depth, seed)
    times["one at a time"] = time.perf_counter() - start
    start = time.perf_counter()
    trial.group(variant, depth, list(range(seeds)))
    times["grouped"] = time.perf_counter() - start
    return times


def probe_report(variant: str, seeds: int, steps: list[int], data_dir: str, rounds: int) -> dict:
    """Each way's probe time at both step counts (median of `rounds`), its cost per step and the projection to a
    705-step probe."""
    measured = {n: [search_probe(variant, seeds, n, data_dir) for _ in range(rounds)] for n in steps}
    report = {}
    for way in ("one at a time", "grouped"):
        at = {n: statistics.median(r[way] for r in measured[n]) for n in steps}
        per_step = (at[steps[1]] - at[steps[0]]) / (steps[1] - steps[0])
        fixed = at[steps[0]] - steps[0] * per_step
        report[way] = {f"{n} steps (s)": round(at[n], 2) for n in steps} | {
            "per step (s)": round(per_step, 3),
            "fixed (s)": round(fixed, 1),
            "705 steps (min)": round((fixed + 705 * per_step) / 60, 1),
        }
    report["grouped / one at a time, 705 steps"] = round(
        report["grouped"]["705 steps (min)"] / report["one at a time"]["705 steps (min)"], 2
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["elu", "tanh_bn", "elu_bn"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", help="the MNIST 10k folder: also time the search's own probe, one way and the other")
    parser.add_argument("--probe_steps", type=int, nargs=2, default=[4, 12])
    parser.add_argument("--only_probe", action="store_true", help="time the search's probe alone")
    args = parser.parse_args()
    if args.data:
        for variant in args.variants:
            report = probe_report(variant, args.seeds, args.probe_steps, args.data, args.rounds)
            print(json.dumps({f"search probe, {variant} k = {settings(variant)['depth']}": report}), flush=True)
        if args.only_probe:
            return
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
