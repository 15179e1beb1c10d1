"""What TrainingDynamics adds to a training epoch, at every_n_steps 1, 10 and 50.

Two of the configs that have it on: the quickstart (ResNet k = 9 on the embedded digits, SGD, batch 64) and
the dead-unit study's MNIST VGG net (Adam, batch 128, the official MNIST test file split 8,000 / 1,000 /
1,000). The callback works in the training steps only, so the epochs timed are training epochs (no
validation). On a shared machine whole fits drift against each other by more than the few percent measured
here, so each interval is measured inside one fit: the callback is active on odd epochs only (its interval
counted in optimizer steps as usual, so an active epoch holds the measured steps that fall in it), and the
overhead is the trimmed mean of the active epochs over that of the others, minus 1.

    python benchmarks/training_dynamics.py [--data ../shared/datasets/mnist-10k] [--pairs 12]
"""

from __future__ import annotations

import argparse
import json
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

INTERVALS = (50, 10, 1)


class Alternating(TrainingDynamics):
    """TrainingDynamics active on odd epochs only, each epoch timed."""

    def __init__(self, every_n_steps: int):
        super().__init__(every_n_steps=every_n_steps)
        self.times: dict[bool, list[float]] = {True: [], False: []}
        self.start = 0.0

    def active(self, trainer) -> bool:
        return trainer.current_epoch % 2 == 1

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch > 0:  # the first epoch warms up
            self.times[self.active(trainer)].append(time.perf_counter() - self.start)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.active(trainer):
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.active(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def trimmed_mean(values: list[float], share: float = 0.2) -> float:
    """The mean without the `share` lowest and highest values (a busy neighbour's spikes)."""
    cut = int(len(values) * share)
    kept = sorted(values)[cut : len(values) - cut]
    return sum(kept) / len(kept)


def quickstart() -> tuple[Classifier, pl.LightningDataModule]:
    net = net_from_config(ROOT / "configs" / "quickstart.yaml")
    model = Classifier(net, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    return model, Digits(batch_size=64)


def mnist_vgg(data: Path) -> tuple[Classifier, pl.LightningDataModule]:
    net = net_from_config(ROOT / "configs" / "dead_units" / "mnist_vgg_adam.yaml")
    model = Classifier(net, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    datamodule = MNIST(str(data), test_file_only=True, val_size=1000, test_size=1000, batch_size=128)
    return model, datamodule


def fit(build, every: int, pairs: int) -> Alternating:
    """One fit of 1 + 2 * pairs training epochs, the callback active on the odd ones."""
    pl.seed_everything(0, verbose=False)
    model, datamodule = build()
    callback = Alternating(every)
    with tempfile.TemporaryDirectory() as folder:
        trainer = pl.Trainer(
            max_epochs=1 + 2 * pairs,
            limit_val_batches=0,
            logger=CSVLogger(folder),
            callbacks=[callback],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, datamodule=datamodule)
    return callback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "mnist-10k")
    parser.add_argument("--pairs", type=int, default=12, help="pairs of epochs (without, with) per interval")
    args = parser.parse_args()
    nets = {"quickstart (ResNet k=9, digits)": (quickstart, args.pairs * 3)}  # its epochs are short: more of them
    if (args.data / "t10k-images-idx3-ubyte").exists() or (args.data / "t10k-images-idx3-ubyte.gz").exists():
        nets["mnist_vgg (Adam, MNIST)"] = (lambda: mnist_vgg(args.data), args.pairs)
    else:
        print(f"no MNIST test file in {args.data}: the MNIST VGG net is left out", flush=True)
    results = {}
    for net, (build, pairs) in nets.items():
        results[net] = {}
        for every in INTERVALS:
            times = fit(build, every, pairs).times
            off, on = trimmed_mean(times[False]), trimmed_mean(times[True])
            results[net][f"every {every}"] = {"epoch_s": round(off, 3), "overhead": round(on / off - 1, 4)}
            print(
                f"{net:34s} every {every:<3d} epoch {off:6.3f} s, with it {on:6.3f} s: {on / off - 1:+.1%}", flush=True
            )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
