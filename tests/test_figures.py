"""Histograms of unit variances: a density over log10(variance), with zero-variance units counted, not drawn."""

import numpy as np
import torch

from callbacks.figures import log_variance_density, variance_histograms
from lightning_modules.studies.sweep_plots import plot_variance_by_width


def lognormal_with_a_near_dead_unit() -> np.ndarray:
    values = np.random.default_rng(0).lognormal(mean=0.0, sigma=0.5, size=999)  # the bulk, around 1
    return np.append(values, 1e-9)


def test_the_tallest_bar_is_in_the_bulk_not_at_a_near_dead_unit():
    values = lognormal_with_a_near_dead_unit()
    density, edges, zero = log_variance_density(values, bins=40)
    tallest = np.argmax(density)
    centre = (edges[tallest] + edges[tallest + 1]) / 2
    assert -0.5 < centre < 0.5  # log10 of the bulk's middle (1)
    assert zero == 0 and np.isclose((density * np.diff(edges)).sum(), 1.0)
    # the old plot's density over raw variances: the bar at 1e-9 towered over the bulk
    raw, raw_edges = np.histogram(values, bins=np.logspace(-9, np.log10(values.max()), 40), density=True)
    assert raw_edges[np.argmax(raw)] < 1e-8


def test_zero_variance_units_are_counted_apart():
    density, _, zero = log_variance_density(np.array([0.0, 0.0, 1.0, 2.0, 4.0]), bins=3)
    assert zero == 2 and len(density) == 3


def test_both_variance_plots_draw(tmp_path):
    values = lognormal_with_a_near_dead_unit()
    variance_histograms({"hidden": values, "dead": np.zeros(8)}, "title", tmp_path / "a.png")
    rows = [{"width": 64}, {"width": 128}]
    plot_variance_by_width(rows, [torch.tensor(values[:64]), torch.tensor(values)], tmp_path / "b.png")
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0
