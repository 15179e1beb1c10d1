"""The noise-robustness test of research line 5: accuracy on a noisy test split at levels 0, 0.05, ..., 0.5.

The noise is the datamodule's (`noise_dataloader`): Speech Commands mixes white noise into the
waveform before the features, (1 - a) x + a U(-1, 1); images get that fraction of pixels set to
mean + 2 std (the paper's MNIST noise). It is seeded, so every model sees the same noisy inputs.
The noise score is the number of correct answers summed over all levels, a = 0 included.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_modules.errors import ConfigError, require
from lightning_modules.run.checkpoints import load_net
from lightning_modules.run.config_files import net_from_config
from lightning_modules.run.files import atomic_savefig, atomic_write, atomic_write_csv
from lightning_modules.studies.study import Study
from lightning_modules.studies.trials import portable

NOISE_LEVELS = tuple(round(0.05 * i, 2) for i in range(11))
FILES = {"csv": "noise.csv", "md": "noise.md", "plot": "noise.png"}


@dataclass
class NoiseResult:
    """One model's correct answers per noise level, out of `total` samples per level."""

    model: str
    total: int
    correct: dict[float, int] = field(default_factory=dict)

    @property
    def noise_score(self) -> int:
        return sum(self.correct.values())

    def accuracy(self, level: float) -> float:
        return self.correct[level] / self.total


@torch.no_grad()
def evaluate_noise(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loaders: Callable[[float], object],
    levels: tuple[float, ...],
    name: str,
    device: torch.device,
) -> NoiseResult:
    """Correct answers of `forward` (in eval mode) on `loaders(level)` at every level; one host sync per level."""
    result = NoiseResult(name, 0)
    for level in levels:
        correct = torch.zeros((), dtype=torch.long, device=device)
        total = 0
        for x, y in loaders(level):
            x, y = x.to(device), y.to(device)
            correct += (forward(x).argmax(dim=1) == y).sum()
            total += len(y)
        result.correct[level] = int(correct)
        result.total = total
    return result


def checkpoint_label(path: Path) -> str:
    """A model's name in the tables: its run folder (`kwinners/mnist_sparse/version_0`), else the file name."""
    parts = path.resolve().parts
    if len(parts) >= 3 and parts[-2] == "checkpoints" and "runs" in parts:
        start = len(parts) - 1 - parts[::-1].index("runs")
        return "/".join(parts[start + 1 : -2])
    return path.stem


def write_noise_results(results: list[NoiseResult], folder: Path) -> dict[str, Path]:
    """noise.csv (a row per model and level), noise.md (accuracy per level and the noise score), noise.png."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / name for kind, name in FILES.items()}
    rows = (
        {"model": r.model, "noise": level, "accuracy": r.accuracy(level), "correct": c, "total": r.total}
        for r in results
        for level, c in r.correct.items()
    )
    atomic_write_csv(paths["csv"], ["model", "noise", "accuracy", "correct", "total"], rows)
    levels = list(results[0].correct)
    lines = [
        "| model | " + " | ".join(f"{level:g}" for level in levels) + " | noise score |",
        "| --- |" + " ---: |" * (len(levels) + 1),
    ]
    lines += [
        f"| {r.model} | " + " | ".join(f"{100 * r.accuracy(level):.2f}" for level in levels) + f" | {r.noise_score:,} |"
        for r in results
    ]
    total = results[0].total
    note = f"Accuracy (%) per noise level on {total:,} samples per level; the score sums correct answers over all levels (at most {total * len(levels):,})."
    atomic_write(paths["md"], note + "\n\n" + "\n".join(lines) + "\n")
    plot_noise(results, paths["plot"])
    return paths


def plot_noise(results: list[NoiseResult], path: Path) -> None:
    """Accuracy against noise level, one curve per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        levels = list(r.correct)
        ax.plot(levels, [r.accuracy(a) for a in levels], "o-", label=f"{r.model} (score {r.noise_score:,})")
    ax.set(xlabel="noise level a", ylabel="test accuracy", ylim=(0, 1.02), title="Accuracy under input noise")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def run_noise(
    study: Study,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    checkpoints: list[str] | str | None,
    levels: list[float] | None,
    split: str,
    noise_seed: int,
) -> list[NoiseResult]:
    """The `noise` subcommand (its arguments are documented on the Trainer's method): each checkpoint evaluated with
    its own run's net at every level; then noise.csv, noise.md, the plot and the W&B table."""
    study.require_one_process("it evaluates on one device")
    require("fraction", **{f"levels[{i}]": level for i, level in enumerate(levels or ())})
    paths = [checkpoints] if isinstance(checkpoints, str) else list(checkpoints or [])
    if not paths:
        raise ConfigError("noise needs --checkpoints: one or more checkpoints of trained models")
    if not callable(getattr(datamodule, "noise_dataloader", None)):
        raise ConfigError(f"noise needs a datamodule with noise_dataloader; {type(datamodule).__name__} has none")
    levels = tuple(levels) if levels is not None else NOISE_LEVELS
    study.set_up(datamodule, "test")
    device = study.trainer.strategy.root_device
    results = []
    for path in map(Path, paths):
        config = path.parent.parent / "config.yaml"  # the checkpoint's own run's net, else this config's
        net = net_from_config(config) if config.is_file() else copy.deepcopy(model.net)
        load_net(net, path)
        evaluated = copy.deepcopy(portable(model))  # without the trainer and the CLI the model refers to
        evaluated.net = net
        evaluated.setup("test")
        evaluated.to(device).eval()
        loaders = functools.partial(noisy_loader, datamodule, split, noise_seed)
        result = evaluate_noise(evaluated, loaders, levels, checkpoint_label(path), device)
        accuracies = ", ".join(f"{level:g}: {result.accuracy(level):.4f}" for level in levels)
        print(f"noise {result.model}: {accuracies}; noise score {result.noise_score:,}", flush=True)
        results.append(result)
    written = write_noise_results(results, study.folder)
    print(written["md"].read_text())
    print(f"noise results: {written['csv']}, {written['md']}, {written['plot']}")
    rows = [
        {"model": r.model, **{f"acc@{a:g}": r.accuracy(a) for a in levels}, "noise_score": r.noise_score}
        for r in results
    ]
    study.report(tables={"noise/results": rows}, images={"noise/accuracy_vs_noise": written["plot"]})
    return results


def noisy_loader(datamodule: pl.LightningDataModule, split: str, seed: int, level: float):
    """The datamodule's `split` at noise `level`, seeded alike for every model."""
    return datamodule.noise_dataloader(split, level, seed)
