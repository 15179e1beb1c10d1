"""Regenerate docs/results/network-size.md: learned sizes against static nets, and the static width sweep, on the
10k split.

    python docs/results/make/network_size.py [--seeds 4] [--only BLOCK] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from regenerate import Page, percent, read_csv, regenerate, spread, table

SMOKE_GRIDS = {  # a smoke run's grids: two small points of each kind
    "sizes": "[{layer: [flexible], width: [64], start_size: [8, 32], penalty: [0.003]}, "
    "{layer: [sparsifier], width: [32], penalty: [0.001, 0.01]}, {layer: [static], width: [16, 32]}]",
    "widths": "[{layer: [static], width: [16, 32]}]",
}


def sweep(page: Page, key: str, *configs: str, extra: tuple[str, ...] = ()) -> dict[tuple, list[dict]]:
    """A sweep on the 10k split; its runs.csv rows grouped by grid point (layer, width, start size, penalty)."""
    config = [arg for c in (*configs, "presets/mnist_10k.yaml") for arg in ("--config", page.config(c))]
    tiny = page.pick((), ("--grids", SMOKE_GRIDS[key]))
    seeds = ("--seeds", str(page.options.seeds))
    folder: Path = page.train("sweep", key, *config, *page.data, *seeds, *extra, *tiny)
    points: dict[tuple, list[dict]] = {}
    for row in read_csv(folder / "runs.csv"):
        points.setdefault((row["layer"], int(row["width"]), row["start_size"], row["penalty"]), []).append(row)
    return points


def mean(rows: list[dict], column: str) -> float:
    return statistics.mean(float(r[column]) for r in rows)


def learned_sizes(page: Page) -> str:
    points = sweep(page, "sizes", "network_size/flexible.yaml", "network_size/sweep_sizes.yaml")
    rows, static = [], []
    for (layer, width, start, penalty), runs in points.items():
        if layer == "static":
            static.append((width, mean(runs, "val_acc")))
            continue
        net = f"flexible, N = {width:,}" if layer == "flexible" else layer
        size = spread([float(r["size"]) for r in runs]) if layer == "flexible" else f"{mean(runs, 'size'):.1f}"
        start = f"{float(start):g}" if start else str(width)
        rows.append([net, start, f"{float(penalty):g}", size, percent(mean(runs, "val_acc"), 2)])
    if static:
        widths = " / ".join(str(w) for w, _ in static)
        rows.append(["static", widths, "", "", " / ".join(f"{100 * a:.2f}" for _, a in static) + "%"])
    return table(["net", "start", "penalty", "final size (spread over seeds)", "val acc"], rows)


def width_sweep(page: Page) -> str:
    extra = ("--epochs", "5")
    points = sweep(page, "widths", "network_size/static.yaml", "network_size/sweep_widths.yaml", extra=extra)
    rows = [
        [f"{width:,}", percent(mean(runs, "val_acc"), 2), f"{mean(runs, 'dead'):.1f}", f"{mean(runs, 'var_sum'):,.0f}",
         f"{mean(runs, 'shapiro_w'):.2f}"]
        for (_, width, _, _), runs in sorted(points.items(), key=lambda item: item[0][1])
    ]  # fmt: skip
    seeds = len(next(iter(points.values())))
    header = ["width N", f"val acc (mean of {seeds} seeds)", "dead units", "summed variance", "Shapiro-Wilk W"]
    return table(header, rows)


def seeds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=4, help="seeds per grid point of both sweeps")


BLOCKS = {"network-size/learned-sizes": learned_sizes, "network-size/width-sweep": width_sweep}


def main(argv: list[str] | None = None) -> None:
    regenerate("network-size", BLOCKS, argv, seeds)


if __name__ == "__main__":
    main(sys.argv[1:])
