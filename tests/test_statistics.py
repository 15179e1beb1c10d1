"""Streamed moments, EM mixture fits and the per-layer summaries, against known answers."""

import numpy as np
import pytest
import torch

from lightning_modules.statistics.mixtures import fit_exp_normal, fit_two_gammas
from lightning_modules.statistics.moments import MomentAccumulator, Moments
from lightning_modules.statistics.unit_statistics import pca_summary, variance_summary


def moments_of(*batches: torch.Tensor) -> Moments:
    accumulator = MomentAccumulator()
    for batch in batches:
        accumulator.update(batch)
    return accumulator.moments()


def test_streamed_moments_equal_the_two_pass_result_far_from_zero():
    torch.manual_seed(0)
    x = 1e3 + torch.randn(1000, 6, 3, 3)  # mean/std = 1000: E[x^2] - E[x]^2 in float32 loses the variance
    state = moments_of(*x.split(37))
    per_unit = x.double().transpose(0, 1).reshape(6, -1)
    exact = per_unit.var(1, correction=0)
    assert state.count.item() == 9000
    assert torch.allclose(state.mean, per_unit.mean(1), rtol=1e-7)
    assert torch.allclose(state.var, exact, rtol=1e-4)
    flat = x.transpose(0, 1).reshape(6, -1)
    naive = flat.square().mean(1) - flat.mean(1).square()  # what a plain sum-of-squares accumulator gets
    assert (naive.double() - exact).abs().max() > 1e-2


def test_channels_last_maps_give_the_same_moments():
    torch.manual_seed(2)
    x = torch.randn(8, 5, 4, 4) * 2 + 3
    plain, nhwc = moments_of(x), moments_of(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(plain.mean, nhwc.mean) and torch.allclose(plain.var, nhwc.var)


def test_merging_parts_in_any_grouping_gives_the_moments_of_the_whole():
    torch.manual_seed(1)
    data = [torch.randn(n, 5) * 3 + 1 for n in (1, 10, 100)]
    parts = [moments_of(d) for d in data]
    whole = moments_of(torch.cat(data))
    left = parts[0].merge(parts[1]).merge(parts[2])
    right = parts[0].merge(parts[1].merge(parts[2]))
    for merged in (left, right):
        assert torch.allclose(merged.mean, whole.mean) and torch.allclose(merged.m2, whole.m2)
    empty = Moments.zeros(5)
    assert torch.allclose(empty.merge(left).var, left.var) and torch.allclose(left.merge(empty).mean, left.mean)
    assert torch.equal(Moments.unpack(left.pack()).m2, left.m2)


def test_exp_normal_em_recovers_a_known_mixture():
    rng = np.random.default_rng(0)
    n = 20000
    from_exp = rng.random(n) < 0.3
    x = np.abs(np.where(from_exp, rng.exponential(1 / 4.0, n), rng.normal(2.0, 0.3, n)))
    for scale in (1.0, 1e-5):  # variances of any size fit alike
        fit = fit_exp_normal(x * scale)
        assert fit.w_exp == pytest.approx(0.3, abs=0.02)
        assert fit.rate == pytest.approx(4.0 / scale, rel=0.05)
        assert fit.mu == pytest.approx(2.0 * scale, rel=0.01)
        assert fit.sigma == pytest.approx(0.3 * scale, rel=0.05)


def test_two_gamma_em_recovers_a_known_mixture():
    rng = np.random.default_rng(1)
    n = 20000
    first = rng.random(n) < 0.4
    x = np.where(first, rng.gamma(2.0, 0.1, n), rng.gamma(30.0, 0.05, n))
    fit = fit_two_gammas(x * 1e3)
    assert fit.w1 == pytest.approx(0.4, abs=0.02)
    assert fit.k1 == pytest.approx(2.0, rel=0.1) and fit.theta1 == pytest.approx(0.1e3, rel=0.1)
    assert fit.k2 == pytest.approx(30.0, rel=0.1) and fit.theta2 == pytest.approx(0.05e3, rel=0.1)


@pytest.mark.parametrize("fit", [fit_exp_normal, fit_two_gammas])
def test_fits_refuse_data_they_cannot_fit(fit):
    with pytest.raises(ValueError):
        fit(np.ones(100))
    with pytest.raises(ValueError):
        fit(np.arange(5.0) + 1)


def test_variance_summary_counts_zeros_and_fits_only_the_live_units():
    rng = np.random.default_rng(2)
    var = np.concatenate([np.zeros(40), rng.gamma(5.0, 0.2, 400)])
    summary = variance_summary(var)
    assert summary["zero_var"] == 40 and summary["var_sum"] == pytest.approx(var.sum())
    assert 0 < summary["shapiro_w"] < 1 and summary["shapiro_p"] < 1e-6  # a spike at 0 is far from normal
    assert np.isfinite(summary["expnorm_rate"]) and summary["expnorm_rate"] < 100  # not a spike on the zeros
    assert summary["gammas_w1"] + (1 - summary["gammas_w1"]) == pytest.approx(1)
    tiny = variance_summary(np.array([0.0, 1.0]))
    assert np.isnan(tiny["shapiro_w"]) and np.isnan(tiny["gammas_k1"])


def test_pca_of_rank_two_data_needs_two_components():
    torch.manual_seed(0)
    basis = torch.randn(2, 20)
    rows = torch.randn(500, 2) @ basis + 5.0
    ratio, summary = pca_summary(rows, [1, 2, 5])
    assert ratio[:2].sum() == pytest.approx(1.0, abs=1e-9) and summary["pca_k90"] <= 2
    assert summary["pca_recon_k2"] < 1e-5 and summary["pca_recon_k1"] > 0.1  # float32 rows: rank 2 up to rounding
    assert summary["pca_recon_k5"] < 1e-5
