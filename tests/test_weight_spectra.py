"""Weight spectra (spec 08): closed forms and planted tails, and WeightSpectra in a fit."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from callbacks import WeightSpectra
from callbacks.weight_spectra import plotted
from lightning_modules.statistics.spectra import layer_matrix, power_law, spectrum
from tests.conftest import CONFIGS, QUIET, cli


def pareto(alpha: float, n: int, seed: int) -> torch.Tensor:
    """n draws of p(x) ~ x^-alpha for x >= 1 (inverse CDF: x = u^(-1 / (alpha - 1)))."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return u ** (-1 / (alpha - 1))


def orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@pytest.mark.parametrize("alpha", [2.5, 3.0, 4.0])
def test_a_sample_with_a_planted_pareto_tail_gives_its_alpha_back(alpha):
    fit = power_law(pareto(alpha, 2000, seed=int(alpha * 10)))
    # the maximum-likelihood alpha's standard error is (alpha - 1) / sqrt(n) for the n values of the tail found
    assert fit.tail >= 500
    assert fit.alpha == pytest.approx(alpha, abs=4 * (fit.alpha - 1) / math.sqrt(fit.tail))
    assert fit.ks < 0.05


def test_a_matrix_whose_squared_singular_values_have_a_planted_tail_gives_it_back():
    values = pareto(3.0, 400, seed=1)  # the eigenvalues of W^T W
    w = orthogonal(400, 2) @ torch.diag(values.sqrt()) @ orthogonal(800, 3)[:400]
    s = spectrum(w.float())
    assert s.fit.alpha == pytest.approx(3.0, abs=4 * (s.fit.alpha - 1) / math.sqrt(s.fit.tail))
    assert s.spectral_norm == pytest.approx(values.max().sqrt().item(), rel=1e-5)
    assert s.weighted_alpha == pytest.approx(s.fit.alpha * math.log10(values.max().item()), rel=1e-5)


def test_a_random_gaussian_matrix_fits_no_heavy_tail():
    s = spectrum(torch.randn(500, 1000, generator=torch.Generator().manual_seed(0)))
    # Marchenko-Pastur: a hard edge, no power law; the fit runs to a steep alpha with a poor KS distance
    assert s.fit.alpha > 6
    planted = power_law(pareto(3.0, 500, seed=4))
    assert s.fit.ks > 2 * planted.ks


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_the_stable_rank_of_a_rank_r_matrix_with_equal_singular_values_is_r(rank):
    u, v = orthogonal(20, 5)[:, :rank], orthogonal(30, 6)[:, :rank]
    s = spectrum(2.5 * u @ v.T)
    assert s.stable_rank == pytest.approx(rank, rel=1e-9)
    assert s.spectral_norm == pytest.approx(2.5, rel=1e-9)


def test_a_conv_kernel_is_the_matrix_of_its_output_channels_against_its_inputs_and_positions():
    kernel = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(7))
    matrix = layer_matrix(kernel)
    assert matrix.shape == (8, 27) and matrix.dtype == torch.float64
    assert torch.equal(matrix[2, 9:18], kernel[2, 1].reshape(-1).double())
    assert spectrum(kernel).spectral_norm == pytest.approx(torch.linalg.matrix_norm(matrix, 2).item(), rel=1e-9)


def test_spectra_too_small_or_flat_for_a_tail_get_no_alpha():
    assert math.isnan(power_law(torch.tensor([3.0, 2.0, 1.0]), min_tail=10).alpha)
    assert math.isnan(power_law(torch.ones(50)).alpha)  # equal values: ln(x / x_min) = 0, no finite alpha
    small = spectrum(torch.randn(5, 64, generator=torch.Generator().manual_seed(8)))  # 5 eigenvalues, min_tail 10
    assert math.isnan(small.fit.alpha) and math.isnan(small.weighted_alpha) and small.fit.tail == 0
    assert small.spectral_norm > 0 and 1 <= small.stable_rank <= 5  # measured all the same


def metrics(folder: Path) -> list[dict]:
    return list(csv.DictReader(next((folder / "runs").rglob("metrics.csv")).open()))


def test_a_fit_logs_each_layers_spectrum_every_epoch_and_draws_the_last(in_tmp):
    cli("fit", "--config", CONFIGS / "quickstart.yaml", "--trainer.max_epochs", "2", "--trainer.limit_train_batches",
        "2", "--trainer.limit_val_batches", "1", "--config", CONFIGS / "presets/weight_spectra.yaml", *QUIET)  # fmt: skip
    rows = [r for r in metrics(in_tmp) if r.get("spectra/alpha_mean")]
    assert [r["epoch"] for r in rows] == ["0", "1"]
    layers = {k.split("/")[1] for k in rows[0] if k.startswith("spectra/") and k.endswith("/stable_rank")}
    assert len(layers) >= 3
    for row in rows:
        ranks = [float(row[f"spectra/{name}/stable_rank"]) for name in layers]
        assert all(r >= 1 for r in ranks)
        assert float(row["spectra/stable_rank_mean"]) == pytest.approx(sum(ranks) / len(ranks), rel=1e-6)
    assert next((in_tmp / "runs").rglob("weight_spectra.png")).stat().st_size > 0


def test_in_a_stream_it_measures_at_every_tasks_end(in_tmp):
    cli("fit", "--config", CONFIGS / "plasticity/permuted_digits.yaml", "--data.init_args.tasks", "3",
        "--data.init_args.steps_per_task", "2", "--trainer.max_steps", "6", "--trainer.val_check_interval", "2",
        "--trainer.callbacks+=WeightSpectra", "--trainer.callbacks.on", "validation", *QUIET)  # fmt: skip
    rows = [r for r in metrics(in_tmp) if r.get("spectra/alpha_mean")]
    assert [r["step"] for r in rows] == [r["step"] for r in metrics(in_tmp) if r.get("task/index")]
    assert len(rows) == 3


def test_the_figure_draws_chosen_layers_or_nine_evenly_spaced():
    spectra = {f"conv{i}": spectrum(torch.randn(4, 9)) for i in range(20)}
    assert list(plotted(spectra, None)) == [f"conv{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19)]
    assert list(plotted(spectra, ("conv1*",))) == [f"conv{i}" for i in [1, *range(10, 20)]]


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(Exception, match="every_n_epochs"):
        WeightSpectra(every_n_epochs=0)
    with pytest.raises(Exception, match="min_tail"):
        WeightSpectra(min_tail=0)
