"""Many seeds of a tiny net: one vmapped stack against training them one by one.

16 seeds of the static 784 -> 256 -> 10 net (configs/network_size/static.yaml: Adam lr 1e-3,
batch 64), 3 epochs each on the MNIST test file split (8,000 train / 2,000 val, seed 0); every mode
validates after each epoch. Times are wall-clock for all seeds together.

    python benchmarks/seed_sweep.py --data ../shared/datasets/mnist-10k [--seeds 16] [--processes 16]

Modes:
  stack        SeedStack: all seeds as one vmapped model (what `train.py sweep` runs), in-process
  loop         the same seeds one after another in one process, a plain PyTorch loop per seed
  lightning    the same seeds one after another in one process, a Lightning fit per seed
  processes    `python train.py fit` once per seed, as separate processes (W&B off, checkpoints on)

In-process modes run round-robin `--rounds` times and keep their best time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules import MNIST  # noqa: E402
from lightning_modules import LearnedSize  # noqa: E402
from lightning_modules.nets import MLP  # noqa: E402
from lightning_modules.studies.seed_stack import SeedStack  # noqa: E402
from lightning_modules.studies.trials import quiet_lightning  # noqa: E402

EPOCHS, WIDTH = 3, 256
adam = partial(torch.optim.Adam, lr=1e-3)


def data_module(data: Path) -> MNIST:
    dm = MNIST(data_dir=str(data), download=False, test_file_only=True, val_size=2000, seed=0, batch_size=64)
    dm.setup("fit")
    return dm


def stack(data: Path, seeds: list[int]) -> float:
    dm = data_module(data)
    start = time.perf_counter()
    runs = SeedStack.build([partial(MLP, WIDTH)], seeds)
    records = runs.fit(dm, EPOCHS, lambda named: adam([p for _, p in named]))
    print(f"  stack: val acc {min(records[-1].val_acc):.4f}-{max(records[-1].val_acc):.4f}")
    return time.perf_counter() - start


def loop(data: Path, seeds: list[int]) -> float:
    dm = data_module(data)
    start = time.perf_counter()
    for seed in seeds:
        torch.manual_seed(seed)
        net = MLP(WIDTH)
        optimizer = adam(net.parameters())
        loader = dm.train_dataloader()
        loader.sampler.seed = seed
        for epoch in range(EPOCHS):
            loader.sampler.set_epoch(epoch)
            for x, y in loader:
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                optimizer.step()
            with torch.no_grad():
                correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in dm.val_dataloader())
    print(f"  loop: last seed's val acc {correct / len(dm.splits['val']):.4f}")
    return time.perf_counter() - start


def lightning(data: Path, seeds: list[int]) -> float:
    start = time.perf_counter()
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        model = LearnedSize(MLP(WIDTH), optimizer=adam)
        with quiet_lightning():
            trainer = pl.Trainer(
                max_epochs=EPOCHS,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            trainer.fit(model, datamodule=data_module(data))
    print(f"  lightning: last seed's val acc {trainer.callback_metrics['val/acc'].item():.4f}")
    return time.perf_counter() - start


def processes(data: Path, seeds: list[int], out: Path) -> float:
    start = time.perf_counter()
    for seed in seeds:
        subprocess.run(
            [
                sys.executable,
                "train.py",
                "fit",
                "--config",
                "configs/network_size/static.yaml",
                "--config",
                "configs/presets/mnist_10k.yaml",
                "--data.data_dir",
                str(data),
                "--trainer.max_epochs",
                str(EPOCHS),
                "--trainer.default_root_dir",
                str(out),
                "--trainer.enable_progress_bar",
                "false",
                "--seed_everything",
                str(seed),
                "--wandb",
                "false",
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "mnist-10k")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--processes", type=int, default=16, help="seeds run as separate processes (0: skip)")
    parser.add_argument("--rounds", type=int, default=2, help="in-process modes run round-robin, best kept")
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    modes = {"stack": stack, "loop": loop, "lightning": lightning}
    times = dict.fromkeys(modes, float("inf"))
    for _ in range(args.rounds):  # round-robin: this machine's speed drifts over minutes
        for mode, run in modes.items():
            times[mode] = min(times[mode], run(args.data, seeds))
    if args.processes:
        with tempfile.TemporaryDirectory() as out:
            per_seed = processes(args.data, seeds[: args.processes], Path(out)) / args.processes
        times["processes"] = per_seed * args.seeds
    print(json.dumps({k: round(v, 2) for k, v in times.items()}))
    for mode in ("loop", "lightning", "processes"):
        if mode in times:
            print(f"{mode} / stack: {times[mode] / times['stack']:.2f}x")


if __name__ == "__main__":
    main()
