"""Unit health (spec 06) on hand-built inputs: dormant scores and shares, gradient blocking, duty-cycle entropy,
feature rank, and the died/revived record of DeadUnits; each expected value computed here by hand."""

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from callbacks import ActivationStats, DeadUnits
from lightning_modules import Classifier
from lightning_modules.layers import KWinners
from lightning_modules.statistics.unit_health import (
    blocked_entries,
    dormant_scores,
    dormant_share,
    duty_cycle_entropy,
    effective_rank,
    passing_units,
    singular_values,
    srank,
    summed_abs_per_unit,
)
from tests.conftest import CONFIGS, QUIET, TinyImages, cli, data_args, probe_images, probe_net


def test_dormant_scores_divide_each_units_mean_magnitude_by_the_layers():
    scores = dormant_scores(torch.tensor([0.0, 0.1, 1.9, 2.0]))  # layer mean 1.0
    assert torch.allclose(scores, torch.tensor([0.0, 0.1, 1.9, 2.0]))
    assert dormant_share(scores, 0.0) == 0.25 and dormant_share(scores, 0.1) == 0.5
    assert dormant_share(scores, 0.025) == 0.25
    assert torch.equal(dormant_scores(torch.zeros(3)), torch.zeros(3))  # a silent layer: every unit dormant
    # a conv unit is a channel: |h| averaged over positions per sample, signs ignored, summed over samples
    h = torch.tensor([[[[1.0, -3.0]], [[0.0, 0.0]]], [[[0.5, 0.5]], [[-1.0, 0.0]]]])  # (2 samples, 2 channels, 1 x 2)
    assert torch.equal(summed_abs_per_unit(h), torch.tensor([2.0 + 0.5, 0.0 + 0.5]))
    assert torch.equal(summed_abs_per_unit(h.flatten(2)[:, :, 0]), torch.tensor([1.5, 1.0]))  # linear units


def test_gradient_blocking_is_where_the_activations_slope_is_below_eps():
    """Counted from the outputs h = phi(z), at pre-activations z chosen on both sides of each boundary."""

    def blocked(module: nn.Module, h: torch.Tensor, eps: float = 0.05) -> int:
        return int(blocked_entries(module, h, eps).sum())

    tanh_z = torch.tensor([0.0, 1.0, 2.17, 2.2, -3.0])  # |tanh'| <= 0.05 from |z| = 2.18 on
    assert blocked(nn.Tanh(), torch.tanh(tanh_z)) == 2
    elu_z = torch.tensor([-3.1, -2.9, 0.5])  # exp(-3.1) = 0.045, exp(-2.9) = 0.055
    assert blocked(nn.ELU(), F.elu(elu_z)) == 1
    assert blocked(nn.ELU(alpha=2.0), F.elu(torch.tensor([-3.8, -3.6]), alpha=2.0)) == 1  # 2 exp(z) <= 0.05
    relu_z = torch.tensor([-1.0, 0.0, 2.0])  # the off share, z <= 0
    assert blocked(nn.ReLU(), F.relu(relu_z)) == 2
    assert blocked_entries(nn.Identity(), relu_z) is None
    assert blocked(nn.Tanh(), torch.tanh(tanh_z), eps=1.0) == 5  # no slope exceeds 1


def test_a_unit_passes_gradient_where_one_entry_of_it_is_not_blocked():
    """(2 samples, 3 channels, 2 positions) of tanh outputs: channel 0 saturated at both signs, channel 1 open at one
    entry, channel 2 never saturated; k-winners' units pass where they won (output not 0, a negative win too)."""
    h = torch.tensor([[[0.99, -0.99], [0.99, 0.5], [-0.8, -0.85]], [[-0.995, 0.98], [0.99, 0.99], [-0.89, -0.79]]])
    assert passing_units(nn.Tanh(), h, blocked_entries(nn.Tanh(), h)).tolist() == [False, True, True]
    wins = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    assert passing_units(KWinners(3, percent_on=0.34), wins, None).tolist() == [True, False, True]
    assert passing_units(nn.ReLU(), h, blocked_entries(nn.ReLU(), h)) is None  # read from the peak instead


def test_duty_cycle_entropy_is_the_mean_binary_entropy_beside_its_maximum():
    assert duty_cycle_entropy(torch.tensor([0.5, 0.5]), 0.5) == pytest.approx((1.0, 1.0))
    assert duty_cycle_entropy(torch.tensor([1.0, 0.0]), 0.5) == pytest.approx((0.0, 1.0))  # two units take all
    h = -(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9))
    assert duty_cycle_entropy(torch.full((10,), 0.1), 0.1) == pytest.approx((h, h))


def test_effective_rank_and_srank_from_the_singular_values():
    assert effective_rank(torch.eye(4)) == pytest.approx(4.0)
    assert effective_rank(torch.outer(torch.ones(5), torch.tensor([1.0, 2.0, 3.0]))) == pytest.approx(1.0)
    features = torch.diag(torch.tensor([10.0, 1.0, 0.05]))  # sum 11.05; 99% of it is 10.94: two values
    assert srank(features, delta=0.01) == 2 and srank(features, delta=0.2) == 1
    p = torch.tensor([10.0, 1.0, 0.05]) / 11.05
    assert effective_rank(features) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    wide = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))  # fewer samples than units, and more
    for matrix in (wide, wide.T):
        assert torch.allclose(singular_values(matrix), torch.linalg.svdvals(matrix.double()), atol=1e-10)


def by_hand_scores() -> torch.Tensor:
    """The probe net's conv units (ReLU(w x + b), w = 1, -1, 1, 1 and b = 0, 0, -2, -0.9 on x / 255), their mean
    magnitude over positions and images, over the layer's mean: the dormant scores the callback must find."""
    x = probe_images().float() / 255
    w, b = torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, -2.0, -0.9])
    h = torch.relu(w.view(1, 4, 1, 1) * x + b.view(1, 4, 1, 1))
    means = h.mean(dim=(2, 3)).mean(0)
    return means / means.mean()


def observe_test_split(callback: DeadUnits) -> pl.Trainer:
    trainer = pl.Trainer(logger=False, callbacks=[callback], enable_progress_bar=False, enable_model_summary=False)
    trainer.test(Classifier(probe_net(), channels_last=False), datamodule=TinyImages(probe_images(), batch_size=4))
    return trainer


def test_dead_units_reports_the_dormant_shares_and_blocking_it_measured():
    callback = DeadUnits(split="test", dormant_taus=(0.0, 0.025, 0.5), health_tau=0.5)
    observe_test_split(callback)
    expected = by_hand_scores()
    assert torch.allclose(callback.scores["features"].float(), expected, atol=1e-6)
    shares = callback.health_scalars
    for tau in (0.0, 0.025, 0.5):
        assert shares[f"dormant/tau{tau:g}/features"] == pytest.approx(float((expected <= tau).float().mean()))
    assert shares["dormant/tau0/features"] == 0.5  # units 1 and 2 are dead: dormant at tau 0
    # blocking of the ReLU: the share of pre-activation entries at or below 0
    x = probe_images().float() / 255
    z = torch.tensor([1.0, -1.0, 1.0, 1.0]).view(1, 4, 1, 1) * x + torch.tensor([0.0, 0.0, -2.0, -0.9]).view(1, 4, 1, 1)
    assert shares["blocking/features"] == pytest.approx(float((z <= 0).float().mean()))


def test_the_health_record_counts_units_that_died_and_revived_between_checks(tmp_path):
    callback = DeadUnits(dormant_taus=(0.0,), health_tau=0.0)
    callback.layers = {"hidden": nn.ReLU()}
    for step, sums in ((10, [0.0, 1.0, 1.0, 0.0]), (20, [1.0, 0.0, 1.0, 0.0])):
        callback.sums, callback.samples, callback.blocked = {"hidden": torch.tensor(sums)}, {"hidden": 4}, {}
        at_step = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=step)))
        callback.measure_health(at_step, None, ["hidden"], [4])  # a trainer that has logged `step`
    assert callback.health_scalars["health/hidden/died"] == 1.0  # unit 1
    assert callback.health_scalars["health/hidden/revived"] == 1.0  # unit 0
    record = callback.health["hidden"]
    assert record["steps"] == [10, 20] and [d.tolist() for d in record["dormant"]] == [
        [True, False, False, True],
        [False, True, False, True],
    ]


def test_kwinners_duty_cycles_entropy_is_logged_beside_its_maximum():
    callback = DeadUnits(split="test", types=("KWinners",))
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 10), KWinners(10, percent_on=0.3))
    with torch.no_grad():
        net[2].duty_cycle.copy_(torch.tensor([0.3] * 10))
    trainer = pl.Trainer(logger=False, callbacks=[callback], enable_progress_bar=False, enable_model_summary=False)
    trainer.test(Classifier(net, channels_last=False), datamodule=TinyImages(probe_images(), batch_size=4))
    h = -(0.3 * math.log2(0.3) + 0.7 * math.log2(0.7))
    assert callback.health_scalars["duty_entropy/2"] == pytest.approx(h)
    assert callback.health_scalars["duty_entropy_max/2"] == pytest.approx(h)


def test_activation_stats_reports_the_feature_rank_of_each_layer():
    callback = ActivationStats(split="test", pca=False)
    observe_test_split(callback)
    x = probe_images().float() / 255
    w, b = torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, -2.0, -0.9])
    pooled = torch.relu(w.view(1, 4, 1, 1) * x + b.view(1, 4, 1, 1)).mean(dim=(2, 3))  # (10 images, 4 channels)
    summary = callback.summaries["features"]
    assert summary["erank"] == pytest.approx(effective_rank(pooled), rel=1e-5)
    assert summary["srank"] == srank(pooled) and summary["srank"] <= 2  # two dead channels: rank 2 at most


def test_one_switch_shows_where_a_tanh_depth_net_saturates(in_tmp):
    """`--trainer.callbacks+=callbacks.DeadUnits` on the depth study's tanh net: every tanh layer is observed and
    reports its gradient-blocking and dormant shares (tanh is one of the default types)."""
    config = CONFIGS / "depth" / "tanh.yaml"
    callbacks = cli(
        "fit", "--config", config, *data_args(config, in_tmp / "data"), "--model.init_args.net.init_args.depth", "6",
        "--trainer.callbacks+=callbacks.DeadUnits", "--trainer.fast_dev_run", "true", "--data.batch_size", "8", *QUIET,
    ).trainer.callbacks  # fmt: skip
    (dead,) = [c for c in callbacks if isinstance(c, DeadUnits)]
    assert len(dead.layers) == 6 and all(type(m).__name__ == "Tanh" for m in dead.layers.values())
    for name in dead.layers:
        assert 0 <= dead.health_scalars[f"blocking/{name}"] <= 1
        assert 0 <= dead.health_scalars[f"dormant/tau0.1/{name}"] <= 1


def test_the_callbacks_log_at_the_step_and_epoch_of_the_epochs_own_metrics(in_tmp):
    """A callback's keys go straight to the loggers, at the step Lightning's `self.log` uses for the epoch's
    metrics (the last step taken), so a CSV row or a W&B x-value pairs them with `dead/total` and `val/acc`."""
    trainer = cli(
        "fit", "--config", CONFIGS / "quickstart.yaml", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
        "--trainer.callbacks+=callbacks.ActivationStats", "--trainer.callbacks.pca", "false", *QUIET,
    ).trainer  # fmt: skip
    rows = list(csv.DictReader((Path(trainer.log_dir) / "metrics.csv").open()))
    steps_of = {key: [(r["step"], r["epoch"]) for r in rows if r.get(key)] for key in
                ("val/acc", "dead/total", "dormant/tau0/total", "health/features.0/died", "act/features.0/var_sum")}  # fmt: skip
    assert steps_of["val/acc"] == [("2", "0"), ("5", "1")]  # after steps 0-2 and 3-5
    assert steps_of["dead/total"] == steps_of["dormant/tau0/total"] == steps_of["act/features.0/var_sum"]
    assert steps_of["dead/total"] == steps_of["val/acc"] and steps_of["health/features.0/died"] == [("5", "1")]
    assert (Path(trainer.log_dir) / "dormant_share.png").is_file()  # drawn at the end of fit
