"""The PNG figures of the observing callbacks, drawn with matplotlib's object API (no pyplot state)."""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lightning_modules.run.files import atomic_savefig


class BackgroundFigures:
    """Runs drawing jobs in order on one background thread, so a per-epoch PNG (0.1-0.2 s of
    matplotlib) overlaps training instead of holding it up; `wait()` before the files are needed."""

    def __init__(self):
        self._executor: ThreadPoolExecutor | None = None  # made on first use: a callback must stay picklable
        self._pending: list[Future] = []

    def submit(self, job: Callable[[], object]) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="figures")
        self._pending = [f for f in self._pending if not f.done() or f.exception()]
        self._pending.append(self._executor.submit(job))

    def wait(self) -> None:
        """Block until every submitted job is done; re-raise the first job's error, if any."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def dead_units_figure(rows: list[tuple[str, int, int]], title: str, path: Path) -> Path:
    """Horizontal bars per layer: total units in grey, dead units (DeadUnits' rule per activation) in red, in network
    order."""
    figure = _figure(7, 0.35 * len(rows) + 1.2)
    ax = figure.add_subplot()
    names = [r[0] for r in rows][::-1]
    dead = np.array([r[1] for r in rows][::-1])
    total = np.array([r[2] for r in rows][::-1])
    ax.barh(names, total, color="0.85", label="units")
    ax.barh(names, dead, color="tab:red", label="dead: no gradient on any input")
    for y, (d, t) in enumerate(zip(dead, total, strict=True)):
        ax.text(t, y, f" {d}/{t}", va="center", fontsize=8)
    ax.set_xlabel("units")
    ax.set_xlim(0, total.max() * 1.25)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    longest = max(len(name) for name in names)
    figure.subplots_adjust(
        left=min(0.5, 0.04 + 0.012 * longest), right=0.97, top=0.9, bottom=0.15
    )  # tight_layout costs 40%
    atomic_savefig(figure, path)
    return path


def dormant_share_figure(shares: dict[str, tuple[list[int], list[float]]], title: str, path: Path) -> Path:
    """The share of dormant units against step, one line per layer (from the unit-health record)."""
    figure = _figure(7, 4)
    ax = figure.add_subplot()
    for name, (steps, share) in shares.items():
        ax.plot(steps, share, marker="o", markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("share of units dormant")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    figure.subplots_adjust(left=0.1, right=0.97, top=0.9, bottom=0.13)
    atomic_savefig(figure, path)
    return path


def log_variance_density(
    variances: np.ndarray, bins: int | np.ndarray = 30, zero_tol: float = 0.0
) -> tuple[np.ndarray, np.ndarray, int]:
    """(density of log10(variance) per bin, bin edges in log10 units, zero-variance units left out).

    A density over log10 units, not over variance units: a density over raw variances divides each
    bar by its width in variance units, so a few near-dead units in the narrow bins near 1e-9 tower
    over the bulk. Units at or below `zero_tol` have no logarithm; they are counted, not drawn.
    """
    variances = np.asarray(variances, dtype=np.float64)
    live = variances[variances > zero_tol]
    zero = len(variances) - len(live)
    if len(live) == 0:
        return np.zeros(0), np.zeros(1), zero
    density, edges = np.histogram(np.log10(live), bins=bins, density=True)
    return density, edges, zero


def variance_histograms(variances: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """One histogram of log10 per-unit activation variance per layer, in a grid; zero-variance units in the title."""
    figure, axes = _grid(len(variances), 2.6)
    for ax, (name, var) in zip(axes, variances.items(), strict=True):
        density, edges, zero = log_variance_density(var, bins=min(40, max(5, len(var) // 3)))
        if len(density):
            ax.stairs(density, edges, fill=True, color="tab:blue")
        _label(ax, f"{name} ({len(var)} units, {zero} zero-variance)", "log10 activation variance")
    return _save(figure, title, path)


def _grid(panels: int, height: float) -> tuple:
    """A figure of `panels` panels, up to 3 a row, 4 inches wide and `height` high each: the figure and its axes."""
    columns = min(3, panels)
    rows = math.ceil(panels / columns)
    figure = _figure(4 * columns, height * rows + 0.5)
    return figure, [figure.add_subplot(rows, columns, i + 1) for i in range(panels)]


def _label(ax, title: str, xlabel: str) -> None:
    """A density panel's title and axes' labels, in the grids' small type."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.tick_params(labelsize=7)


def _save(figure, title: str, path: Path) -> Path:
    """The figure under its title, laid out and written atomically."""
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    atomic_savefig(figure, path)
    return path


def spectral_density_figure(spectra: dict, title: str, path: Path) -> Path:
    """Per layer, the empirical spectral density of W^T W on log-log axes (log-spaced bins) with the fitted power law
    drawn over its tail (scaled by the tail's share of the eigenvalues) and lambda_min marked; `spectra`: name ->
    `Spectrum`."""
    from matplotlib.ticker import NullFormatter

    figure, axes = _grid(len(spectra), 2.8)
    for ax, (name, s) in zip(axes, spectra.items(), strict=True):
        values = s.eigenvalues.numpy()
        values = values[values > 0]
        fit = s.fit
        if len(values) > 1 and values.max() > values.min():
            edges = np.geomspace(values.min(), values.max(), min(40, max(5, len(values) // 4)) + 1)
            density, edges = np.histogram(values, bins=edges, density=True)
            ax.stairs(np.where(density > 0, density, np.nan), edges, fill=True, color="tab:blue", alpha=0.6)
            if math.isfinite(fit.alpha):
                x = np.geomspace(fit.lambda_min, values.max(), 50)
                share = fit.tail / len(values)
                ax.plot(x, share * (fit.alpha - 1) / fit.lambda_min * (x / fit.lambda_min) ** -fit.alpha,
                        color="tab:red", label=f"alpha {fit.alpha:.2f} (KS {fit.ks:.2f}, n {fit.tail})")  # fmt: skip
                ax.axvline(fit.lambda_min, color="tab:red", linestyle=":", linewidth=1)
                ax.legend(fontsize=7)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow range labels every minor tick: unreadable
            ax.yaxis.set_minor_formatter(NullFormatter())
        _label(ax, f"{name} ({len(s.eigenvalues)} eigenvalues, stable rank {s.stable_rank:.1f})", "eigenvalue of W^T W")
    return _save(figure, title, path)
