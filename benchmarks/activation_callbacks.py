"""What DeadUnits and ActivationStats add to an epoch that validates every epoch.

Same data (the official MNIST test file, 8,000 train / 2,000 val, seed 0), same nets, batch 128.
The callbacks only work in the validation loop and at its end (reduction, printed table, PNG,
saved tensors), so their cost is measured there, where it is not drowned by the noise of whole
training epochs on a shared machine:

  epoch      median epoch time of a plain fit (training split + validation split, no callback)
  added      median epoch time of a fit with one training batch per epoch, with the callbacks,
             minus the same without them (modes run round-robin, `--rounds` times, to cancel drift)
  overhead   added / epoch

    python benchmarks/activation_callbacks.py [--data ../shared/datasets/mnist-10k] [--rounds 3]

Modes:
  dead            DeadUnits
  dead+stats      DeadUnits and ActivationStats(pca=False)
  dead+stats+pca  DeadUnits and ActivationStats with PCA (2,048 pre-activation vectors per layer)
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

from callbacks import ActivationStats, DeadUnits  # noqa: E402
from datamodules import MNIST  # noqa: E402
from lightning_modules import Classifier  # noqa: E402
from lightning_modules.run.config_files import net_from_config  # noqa: E402

NETS = {
    "mnist_vgg (Adam)": ROOT / "configs" / "dead_units" / "mnist_vgg_adam.yaml",
    "resnet k=9 (ELU+BN)": ROOT / "configs" / "depth" / "resnet.yaml",
}


class EpochTimer(pl.Callback):
    """Wall time of each epoch, validation and the other callbacks' epoch-end work included."""

    def __init__(self):
        self.marks: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.marks.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        self.marks.append(time.perf_counter())

    def epochs(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def callbacks_for(mode: str) -> list[pl.Callback]:
    chosen = []
    if "dead" in mode:
        chosen.append(DeadUnits())
    if "stats" in mode:
        chosen.append(ActivationStats(pca="pca" in mode))
    return chosen


def fit(config: Path, data: Path, mode: str, epochs: int, train_batches: int | None = None) -> list[float]:
    """Epoch times of one fit of the config's net; `train_batches` limits the training batches per epoch."""
    pl.seed_everything(0, verbose=False)
    net = net_from_config(config)
    if hasattr(net, "at_depth"):
        net = net.at_depth(9)
    model = Classifier(net, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=5e-4))
    datamodule = MNIST(str(data), test_file_only=True, val_size=2000, batch_size=128)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as folder:
        trainer = pl.Trainer(
            max_epochs=epochs,
            limit_train_batches=train_batches,
            logger=CSVLogger(folder),
            callbacks=[*callbacks_for(mode), timer],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, datamodule=datamodule)
    return timer.epochs()[1:]  # the first epoch warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "mnist-10k")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    modes = ("none", "dead", "dead+stats", "dead+stats+pca")
    results = {}
    for net, config in NETS.items():
        epoch = statistics.median(fit(config, args.data, "none", 4))
        samples: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode in modes:
                samples[mode] += fit(config, args.data, mode, 6, train_batches=1)
        base = statistics.median(samples["none"])
        results[net] = {"epoch_s": round(epoch, 2)}
        for mode in modes[1:]:
            added = statistics.median(samples[mode]) - base
            results[net][mode] = {"added_s": round(added, 3), "overhead": round(added / epoch, 3)}
            print(f"{net:22s} {mode:15s} epoch {epoch:6.2f} s, added {added:+.3f} s = {added / epoch:+.1%}", flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
