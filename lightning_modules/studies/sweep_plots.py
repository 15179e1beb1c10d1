"""The plots of the network-size study, drawn from a sweep's rows (each only when the sweep has its data).

- variance_by_width.png: the distribution of per-unit activation variance, one curve per static width;
- width_metrics.png: summed variance, dead units, validation accuracy and Shapiro-Wilk W against width;
- size_vs_epoch.png: the learned size of flexible and sparsifier runs against epoch;
- frontier.png: validation accuracy against final size, learned-size runs next to static nets.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from callbacks.figures import log_variance_density
from lightning_modules.run.files import atomic_savefig


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_log_x(ax) -> None:
    """A log-scaled width axis with a labelled tick at each power of two (16, 32, ..., 512), not base 10's one
    labelled tick (100) over the widths 16 to 512, nor 2x10^1."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _by(rows: list[dict], key: str) -> dict:
    groups = defaultdict(list)
    for row in rows:
        groups[row[key]].append(row)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0])))


def _mean_std(rows: list[dict], column: str) -> tuple[float, float]:
    values = np.array([float(r.get(column, math.nan)) for r in rows], dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std())


def plot_variance_by_width(static: list[dict], variances: list[torch.Tensor], path: Path) -> None:
    """Density of log10 per-unit variance, pooled over seeds, one curve per width; the zero-variance units
    (no logarithm) are counted in the legend, not drawn at an arbitrary floor."""
    plt = _pyplot()
    pooled = defaultdict(list)
    for row, var in zip(static, variances, strict=True):
        pooled[row["width"]].append(var.double().numpy())
    pooled = {width: np.concatenate(values) for width, values in sorted(pooled.items())}
    live = np.concatenate([v[v > 0] for v in pooled.values()])
    if len(live) == 0:
        return
    edges = np.linspace(np.log10(live.min()), np.log10(live.max()) + 1e-9, 41)
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = plt.cm.viridis(np.linspace(0, 1, len(pooled)))
    for colour, (width, values) in zip(colours, pooled.items(), strict=True):
        density, _, zero = log_variance_density(values, edges)
        if len(density):
            ax.stairs(density, edges, color=colour, label=f"N={width} ({zero} zero-variance of {len(values)})")
    ax.set(xlabel="log10 per-unit activation variance (live units)", ylabel="density (per log10 unit)")
    ax.set_title("Hidden-unit variance by width")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def plot_width_metrics(static: list[dict], path: Path):
    """Four panels against width (log scale), mean and spread over seeds. Returns the figure."""
    plt = _pyplot()
    by_width = _by(static, "width")
    widths = list(by_width)
    panels = [
        ("var_sum", "summed activation variance"),
        ("dead", "dead units"),
        ("val_acc", "validation accuracy"),
        ("shapiro_w", "Shapiro-Wilk W of the variances"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (column, title) in zip(axes.flat, panels, strict=True):
        stats = [_mean_std(by_width[w], column) for w in widths]
        ax.errorbar(widths, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3)
        for w in widths:
            ax.plot(
                [w] * len(by_width[w]), [r.get(column, math.nan) for r in by_width[w]], ".", color="grey", alpha=0.4
            )
        _plain_log_x(ax)
        ax.set(xlabel="width N", title=title)
    fig.suptitle("Static 784-N-10 nets: hidden-layer metrics against width")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return fig


def plot_size_vs_epoch(history: list[dict], path: Path) -> None:
    """Learned size against epoch, one line per run; epoch 0 is the starting size."""
    plt = _pyplot()
    runs = defaultdict(list)
    for h in history:
        if h["layer"] != "static":
            runs[(h["layer"], h["width"], h["start_size"], h["penalty"], h["seed"])].append(h)
    fig, ax = plt.subplots(figsize=(7, 4))
    labelled = set()
    colours = {}
    for (layer, width, start, penalty, _seed), points in sorted(runs.items(), key=lambda kv: str(kv[0])):
        key = (layer, start, penalty)
        colour = colours.setdefault(key, f"C{len(colours) % 10}")
        first = width if start is None else start
        epochs = [0] + [p["epoch"] + 1 for p in points]
        sizes = [first] + [p["size"] for p in points]
        label = f"{layer} start {first:g}, penalty {penalty:g}"
        ax.plot(epochs, sizes, color=colour, alpha=0.8, label=None if key in labelled else label)
        labelled.add(key)
    ax.set(xlabel="epoch", ylabel="effective size (x0 or live units)", title="Learned size during training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def plot_frontier(static: list[dict], sized: list[dict], path: Path):
    """Validation accuracy against final size: learned-size runs as points coloured by their penalty (one colour
    scale, with its bar), static nets as the frontier. Returns the figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if static:
        by_width = _by(static, "width")
        stats = [_mean_std(by_width[w], "val_acc") for w in by_width]
        ax.errorbar(
            list(by_width), [m for m, _ in stats], yerr=[s for _, s in stats], marker="s", color="black", label="static"
        )
    markers = {"flexible": "o", "sparsifier": "^"}
    positive = [r["penalty"] for r in sized if r["penalty"] > 0] or [1.0]
    low, high = math.log10(min(positive)), math.log10(max(positive))
    points = None
    for layer, rows in _by(sized, "layer").items():
        points = ax.scatter(
            [r["size"] for r in rows],
            [r["val_acc"] for r in rows],
            c=[math.log10(r["penalty"]) if r["penalty"] > 0 else low for r in rows],  # no penalty: the low end
            cmap="plasma",
            vmin=low,
            vmax=high if high > low else low + 1,
            marker=markers.get(layer, "o"),
            label=layer,
        )
    if points is not None:
        fig.colorbar(points, ax=ax, label="log10 penalty")
    _plain_log_x(ax)
    ax.set(xlabel="final size (units)", ylabel="validation accuracy", title="Accuracy against size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return fig


def write_plots(rows: list[dict], history: list[dict], variances: list[torch.Tensor], folder: Path) -> list[Path]:
    """Draw every plot the rows have data for; returns the files written."""
    kept = [(r, v) for r, v in zip(rows, variances, strict=True) if not r["diverged"] and not r.get("error")]
    static = [(r, v) for r, v in kept if r["layer"] == "static"]
    sized = [r for r, _ in kept if r["layer"] != "static"]
    written = []
    if static:
        written.append(folder / "variance_by_width.png")
        plot_variance_by_width([r for r, _ in static], [v for _, v in static], written[-1])
    if len({r["width"] for r, _ in static}) > 1:
        written.append(folder / "width_metrics.png")
        plot_width_metrics([r for r, _ in static], written[-1])
    if sized:
        written.append(folder / "size_vs_epoch.png")
        plot_size_vs_epoch(history, written[-1])
        written.append(folder / "frontier.png")
        plot_frontier([r for r, _ in static], sized, written[-1])
    return [p for p in written if p.exists()]
