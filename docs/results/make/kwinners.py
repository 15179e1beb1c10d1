"""Regenerate docs/results/kwinners.md: the dense and sparse MNIST CNN-2 nets under noise, on the 10k split.

python docs/results/make/kwinners.py [--seeds 0 1 2] [--only BLOCK] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from regenerate import Page, last, percent, read_csv, regenerate, table

NETS = {"dense": "dense CNN-2", "sparse": "sparse CNN-2"}
PAPER = {"dense": (99.31, 97_040), "sparse": (99.09, 103_764)}  # spec 05: full MNIST, test accuracy and noise score
SHOWN = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)  # the levels in the table (noise evaluates every 0.05)


def preset(page: Page) -> list[str]:
    """The 10k split: configs/presets/mnist_10k.yaml and the data folder."""
    return ["--config", page.config("presets/mnist_10k.yaml"), *page.data]


def trained(page: Page) -> dict[tuple[str, int], tuple[Path, Path]]:
    """Each net and seed fitted on the 10k split and tested: (fit folder, test folder)."""
    folders = {}
    for seed in page.options.seeds:
        for net in NETS:
            args = [
                "--config",
                page.config(f"kwinners/mnist_{net}.yaml"),
                *preset(page),
                "--seed_everything",
                str(seed),
            ]
            fitted = page.train("fit", f"{net}_s{seed}", *args)
            last_ckpt = fitted / "checkpoints" / "last.ckpt"
            folders[net, seed] = fitted, page.train("test", f"{net}_s{seed}_test", *args, "--ckpt_path", last_ckpt)
    return folders


def noise(page: Page, folders: dict) -> dict[tuple[str, int], dict[float, tuple[int, int]]]:
    """All checkpoints in one `noise` command: (correct, total) per level, per net and seed; and its plot."""
    checkpoints = [f"--checkpoints+={fitted / 'checkpoints' / 'last.ckpt'}" for fitted, _ in folders.values()]
    folder = page.train(
        "noise", "noise", "--config", page.config("kwinners/mnist_sparse.yaml"), *preset(page), *checkpoints
    )
    page.figure(folder / "noise.png", "kwinners_noise_mnist10k.png")
    keys = {f"{net}_s{seed}": (net, seed) for net, seed in folders}
    results: dict = {}
    for row in read_csv(folder / "noise.csv"):
        key = keys[row["model"].rsplit("/version_", 1)[0]]
        results.setdefault(key, {})[float(row["noise"])] = int(row["correct"]), int(row["total"])
    return results


def score(levels: dict[float, tuple[int, int]]) -> int:
    return sum(correct for correct, _ in levels.values())


def noise_table(page: Page) -> str:
    results = noise(page, trained(page))
    seeds = page.options.seeds
    total = next(iter(results.values()))[0.0][1]
    best = total * len(next(iter(results.values())))
    rows = []
    for net, label in NETS.items():
        accuracy = [statistics.mean(results[net, s][a][0] / total for s in seeds) for a in SHOWN]
        scores = [score(results[net, s]) for s in seeds]
        mean = statistics.mean(scores)
        acc, paper = PAPER[net]
        rows.append([
            label, *(f"{100 * a:.2f}" for a in accuracy),
            f"{mean:,.0f} ({' / '.join(f'{s:,}' for s in scores)}) = {percent(mean / best)}",
            f"{acc:.2f}% / {paper:,} = {percent(paper / 110_000)}",
        ])  # fmt: skip
    levels = [f"a = {SHOWN[0]:g}", *(f"{a:g}" for a in SHOWN[1:])]
    header = ["net", *levels, f"noise score (of {best:,})", "paper, full MNIST: acc. / score (of 110,000)"]
    return table(header, rows)


def seeds_table(page: Page) -> str:
    """Per net and seed: the fit's last epoch, `train.py test` of its checkpoint, and its noise results."""
    folders = trained(page)
    results = noise(page, folders)
    rows = []
    for (net, seed), (fitted, tested) in folders.items():
        metrics = read_csv(fitted / "metrics.csv")
        correct, total = results[net, seed][0.0]
        rows.append([
            NETS[net], str(seed), percent(last(metrics, "train/err"), 2), percent(last(metrics, "val/acc")),
            percent(last(read_csv(tested / "metrics.csv"), "test/acc")), percent(correct / total),
            f"{score(results[net, seed]):,}",
        ])  # fmt: skip
    header = ["net", "seed", "train err (last epoch)", "val acc", "test acc (`train.py test`)", "noise a = 0", "score"]
    return table(header, sorted(rows))


def seeds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of each net")


BLOCKS = {"kwinners/noise": noise_table, "kwinners/seeds": seeds_table}


def main(argv: list[str] | None = None) -> None:
    regenerate("kwinners", BLOCKS, argv, seeds)


if __name__ == "__main__":
    main(sys.argv[1:])
