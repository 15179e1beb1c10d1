"""ActivationStats: per-unit variances equal a direct computation; pre-activations survive in-place ReLUs."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from callbacks import ActivationStats
from lightning_modules import Classifier
from tests.conftest import TinyImages, fit_quickstart, probe_images, probe_net


def direct_statistics(images: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-unit mean and variance over every sample (and position), from one forward pass in float64."""
    net = probe_net().double().requires_grad_(False)
    x = images.double() / 255
    conv = net.features(x)  # (N, 4, 4, 4) after ReLU
    hidden = net.hidden(net.flatten(net.pool(conv.clone())))
    per_channel = conv.transpose(0, 1).reshape(4, -1)
    return {
        "features": (per_channel.mean(1).numpy(), per_channel.var(1, correction=0).numpy()),
        "hidden": (hidden.mean(0).numpy(), hidden.var(0, correction=0).numpy()),
    }


def run_test(callback: ActivationStats, batch_size: int = 3, tmp_path=None) -> pl.Trainer:
    trainer = pl.Trainer(
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.test(Classifier(probe_net(), channels_last=False), datamodule=TinyImages(probe_images(), batch_size))
    return trainer


def test_per_unit_moments_equal_a_direct_computation_in_any_batching():
    expected = direct_statistics(probe_images())
    for batch_size in (1, 3, 10):
        callback = ActivationStats(split="test", pca=False)
        run_test(callback, batch_size)
        for name, (mean, var) in expected.items():
            assert np.allclose(callback.means[name], mean, rtol=1e-6, atol=1e-9)
            assert np.allclose(callback.variances[name], var, rtol=1e-5, atol=1e-12)


def test_dead_units_have_zero_variance_and_layer_sums_match():
    callback = ActivationStats(split="test", pca=False)
    run_test(callback)
    summary = callback.summaries
    # conv units 1 and 2 are dead (always 0); hidden unit 1 too
    assert summary["features"]["zero_var"] == 2 and summary["hidden"]["zero_var"] == 1
    expected = direct_statistics(probe_images())["features"][1].sum()
    assert summary["features"]["var_sum"] == pytest.approx(expected)
    assert "pca_ev1" not in summary["features"]


def test_pca_sees_pre_activations_even_behind_an_in_place_relu():
    callback = ActivationStats(split="test", pca=True, pca_samples=6, pca_k=[1, 2])
    run_test(callback)
    rows = torch.cat(callback.rows["features"])
    assert rows.shape == (6, 4)  # capped at pca_samples, one random position per image
    assert (rows[:, 1] < 0).any()  # conv unit 1 is -x before its ReLU: negative, not the ReLU's 0
    summary = callback.summaries["features"]
    assert 0 < summary["pca_ev1"] <= 1 and summary["pca_recon_k2"] <= summary["pca_recon_k1"]


def test_files_and_figure_in_the_run_folder(in_tmp):
    fit_quickstart("--trainer.callbacks+=callbacks.ActivationStats")
    folder = in_tmp / "runs" / "quickstart" / "version_0"
    header = (folder / "metrics.csv").read_text().splitlines()[0]
    assert "act/features.0/var_sum" in header and "act/features.10/shapiro_w" in header
    (saved,) = (folder / "activation_stats").glob("step*.pt")
    stats = torch.load(saved, weights_only=True)
    assert set(stats["features.0"]) == {"mean", "var", "count", "pca_explained"}
    assert (
        stats["features.0"]["var"].shape == (4,) and stats["features.0"]["count"] == 2 * 64 * 28 * 28
    )  # two validation batches
    assert (folder / "activation_variance.png").stat().st_size > 1000
