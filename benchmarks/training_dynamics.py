"""What TrainingDynamics adds to a training epoch, at every_n_steps 1, 10 and 50.

Two of the configs that have it on: the quickstart (ResNet k = 9 on the embedded digits, SGD, batch 64) and
the dead-unit study's MNIST VGG net (Adam, batch 128, the official MNIST test file split 8,000 / 1,000 /
1,000). The callback works in the training steps only, so the epochs timed are training epochs (no
validation); the VGG epochs are cut to `--vgg_batches` batches to keep the run short. Each round fits every
mode once, round-robin, so a drift of the shared machine's speed hits all alike; a mode's overhead is the
median over rounds of (its median epoch / the same round's median epoch without the callback) - 1.

    python benchmarks/training_dynamics.py [--data ../shared/datasets/mnist-10k] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from callbacks import TrainingDynamics  # noqa: E402
from datamodules import MNIST, Digits  # noqa: E402
from lightning_modules import Classifier  # noqa: E402
from lightning_modules.run.config_files import net_from_config  # noqa: E402

MODES = {"none": None, "every 50": 50, "every 10": 10, "every 1": 1}


class EpochTimer(pl.Callback):
    """Wall time of each training epoch."""

    def __init__(self):
        self.times: list[float] = []
        self.start = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self.start)


def quickstart() -> tuple[Classifier, pl.LightningDataModule, int | None]:
    net = net_from_config(ROOT / "configs" / "quickstart.yaml")
    model = Classifier(net, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    return model, Digits(batch_size=64), None


def mnist_vgg(data: Path, batches: int) -> tuple[Classifier, pl.LightningDataModule, int | None]:
    net = net_from_config(ROOT / "configs" / "dead_units" / "mnist_vgg_adam.yaml")
    model = Classifier(net, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    datamodule = MNIST(str(data), test_file_only=True, val_size=1000, test_size=1000, batch_size=128)
    return model, datamodule, batches


def fit(build, every: int | None, epochs: int) -> list[float]:
    """Training-epoch times of one fit; the first epoch warms up and is left out."""
    pl.seed_everything(0, verbose=False)
    model, datamodule, batches = build()
    timer = EpochTimer()
    callbacks = [timer] if every is None else [TrainingDynamics(every_n_steps=every), timer]
    with tempfile.TemporaryDirectory() as folder:
        trainer = pl.Trainer(
            max_epochs=epochs,
            limit_train_batches=batches,
            limit_val_batches=0,
            logger=CSVLogger(folder),
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, datamodule=datamodule)
    return timer.times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "mnist-10k")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per fit, the first left out")
    parser.add_argument("--vgg_batches", type=int, default=40, help="training batches per MNIST VGG epoch")
    args = parser.parse_args()
    nets = {"quickstart (ResNet k=9, digits)": quickstart}
    if (args.data / "t10k-images-idx3-ubyte").exists() or (args.data / "t10k-images-idx3-ubyte.gz").exists():
        nets["mnist_vgg (Adam, MNIST)"] = lambda: mnist_vgg(args.data, args.vgg_batches)
    else:
        print(f"no MNIST test file in {args.data}: the MNIST VGG net is left out", flush=True)
    results = {}
    for net, build in nets.items():
        epochs: dict[str, list[float]] = {mode: [] for mode in MODES}
        ratios: dict[str, list[float]] = {mode: [] for mode in MODES if mode != "none"}
        for _ in range(args.rounds):
            this_round = {mode: statistics.median(fit(build, every, args.epochs)) for mode, every in MODES.items()}
            for mode, seconds in this_round.items():
                epochs[mode].append(seconds)
                if mode != "none":
                    ratios[mode].append(seconds / this_round["none"])
        results[net] = {"epoch_s": round(statistics.median(epochs["none"]), 3)}
        for mode, values in ratios.items():
            overhead = statistics.median(values) - 1
            spread = (min(values) - 1, max(values) - 1)
            results[net][mode] = {"overhead": round(overhead, 4), "range": [round(v, 4) for v in spread]}
            print(
                f"{net:34s} {mode:9s} epoch {results[net]['epoch_s']:6.3f} s, overhead {overhead:+.1%} "
                f"(rounds {spread[0]:+.1%} .. {spread[1]:+.1%})",
                flush=True,
            )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
