"""Signal propagation at initialisation (spec 06): the mean-field integrals, the measurement on hand-built nets,
the depth-scale fit, delta-orthogonal init, the `propagate` subcommand and the search started from its prediction."""

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_modules.layers.delta_orthogonal import delta_orthogonal_, delta_orthogonal_conv
from lightning_modules.nets import DepthBlock, DepthCNN
from lightning_modules.statistics.mean_field import (
    chi_1,
    critical_sigma_w2,
    fixed_length,
    length_map,
    mean_field,
    padded_conv_factor,
)
from lightning_modules.statistics.propagation import DepthScales, Profile, decay_rate, depth_scales, measure
from lightning_modules.studies.depth_search import run_searches, search_plan, trials_needed
from lightning_modules.studies.propagate import (
    Measured,
    Prediction,
    profile_figure,
    summary_rows,
    theory_of,
    write_propagation,
)
from tests.conftest import CONFIGS, QUIET, cli, make_mnist, small_splits

# --- mean field -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_w2,sigma_b2", [(1.5, 0.05), (2.5, 0.3), (1.0, 0.01)])
def test_quadrature_chi_1_equals_monte_carlo_for_tanh(sigma_w2, sigma_b2):
    q = fixed_length(sigma_w2, sigma_b2, "tanh")
    z = torch.randn(4_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampled = sigma_w2 * float((1 / torch.cosh(math.sqrt(q) * z) ** 4).mean())
    assert chi_1(q, sigma_w2, "tanh") == pytest.approx(sampled, abs=1e-3)
    assert length_map(q, sigma_w2, sigma_b2, "tanh") == pytest.approx(q, rel=1e-10)  # q* is a fixed point


def test_ordered_tanh_without_bias_loses_its_gradient_at_the_rate_of_sigma_w2():
    """The original's N(0, 0.05) tanh net: sigma_w^2 = 9 C_in 0.05^2 < 1, q* = 0, xi_grad = -1 / log sigma_w^2;
    the correlation map is frozen there (c* undefined, xi_c inf: tests/test_mean_field.py)."""
    values = mean_field(9 * 16 * 0.05**2, 0.0, "tanh")
    assert values.q_star == 0 and math.isnan(values.c_star) and values.xi_c == math.inf
    assert values.xi_grad == pytest.approx(-1 / math.log(0.36))


def test_critical_weight_variance_puts_chi_1_at_one_and_scales_diverge():
    for sigma_b2 in (0.0025, 0.3):
        sigma_w2 = critical_sigma_w2(sigma_b2, "tanh")
        values = mean_field(sigma_w2, sigma_b2, "tanh")
        assert values.chi_1 == pytest.approx(1, abs=1e-9) and values.xi_grad > 1e6
        below, above = (chi_1(fixed_length(s, sigma_b2, "tanh"), s, "tanh") for s in (0.9 * sigma_w2, 1.1 * sigma_w2))
        assert below < 1 < above  # ordered below the edge, chaotic above
    chaotic = mean_field(2.5, 0.0, "tanh")  # an odd activation without bias: c* = 0 in the chaotic phase
    assert chaotic.chi_1 > 1 and abs(chaotic.c_star) < 1e-9 and chaotic.chi_c < 1


def test_critical_gain_agrees_with_the_mean_field_row_for_every_activation():
    """`gain: critical` solves chi_1 = 1; the net's mean-field rows must say chi_1 = 1 too (ReLU: sqrt 2, He's)."""
    for activation in ("tanh", "elu", "relu"):
        net = DepthCNN(depth=6, activation=activation, init="delta_orthogonal", gain="critical", bias_std=0.05)
        theory, _ = theory_of(net)
        for stage in theory:
            assert stage.padding == 1 and stage.values.chi_1 == pytest.approx(1, abs=1e-9), activation
            assert stage.values.xi_grad == math.inf and stage.values.xi_c == math.inf, activation
    assert DepthCNN(depth=6, activation="relu", init="delta_orthogonal", gain="critical").settings["gain"] == (
        pytest.approx(math.sqrt(2))
    )


def test_zero_padding_puts_the_better_init_tanh_at_a_finite_mean_field_depth():
    """sigma_w^2 = 1 is critical for an infinite map; zero padding scales q (and the gradient) per conv by 0.99,
    0.97 and 0.90 at 28, 14 and 7 pixels, so the mean field predicts 6 / (mean of -log factor over the convs),
    about 127, not inf."""
    theory, _ = theory_of(DepthCNN(depth=96, activation="tanh", init_std="fan_in"))
    assert {s.size: s.padding for s in theory} == {n: pytest.approx(padded_conv_factor(n)) for n in (28, 14, 7)}
    rate = sum(-math.log(padded_conv_factor(n)) for n in (28, 14, 7)) / 3  # 32 convs per stage
    predicted = Prediction("tanh_init", theory=theory).theory_predicted()
    assert predicted == pytest.approx(6 / rate) and 120 < predicted < 135


def test_a_widening_delta_orthogonal_conv_keeps_q_per_channel_and_the_gradient_in_total():
    """4 -> 8 channels: the forward mean square per channel is kept (exactly: |W x|^2 = 2 |x|^2 over twice the
    channels); backward, W^T keeps half of a gradient's square (a projection onto 4 of 8 dimensions) times 2: its
    total is kept, so its mean square per channel doubles."""
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False, dtype=torch.float64)
    delta_orthogonal_(conv.weight, gain=1.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    assert y.square().mean().item() == pytest.approx(x.square().mean().item(), rel=1e-12)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(g)
    assert x.grad.square().sum().item() == pytest.approx(g.square().sum().item(), rel=0.05)
    assert x.grad.square().mean().item() == pytest.approx(2 * g.square().mean().item(), rel=0.05)


# --- measurement and fit --------------------------------------------------------------------------------------------


def linear_net(width: int, layers: int, sigma_w: float, seed: int = 0) -> tuple[nn.Sequential, list[nn.Module]]:
    """Linear (orthogonal times sigma_w) -> identity, `layers` times, then a linear head: phi = identity."""
    torch.manual_seed(seed)
    modules, points = [], []
    for _ in range(layers):
        linear = nn.Linear(width, width, bias=False, dtype=torch.float64)
        nn.init.orthogonal_(linear.weight, gain=sigma_w)
        point = nn.Identity()
        modules += [linear, point]
        points.append(point)
    modules.append(nn.Linear(width, 10, dtype=torch.float64))
    return nn.Sequential(*modules), points


def test_a_deep_linear_net_scales_q_and_the_gradient_by_sigma_w2_per_layer_exactly():
    sigma_w = 0.9
    net, points = linear_net(width=32, layers=20, sigma_w=sigma_w)
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    profile = measure(net, x, y, points=points)
    q, grad = np.array(profile.q), np.array(profile.grad)
    np.testing.assert_allclose(q[1:] / q[:-1], sigma_w**2, rtol=1e-10)  # forward: |W z| = sigma_w |z|
    np.testing.assert_allclose(grad[:-1] ** 2 / grad[1:] ** 2, sigma_w**2, rtol=1e-10)  # backward: |W^T g| likewise
    assert profile.stage == [0] * 20
    np.testing.assert_allclose(profile.c, profile.c[0], rtol=1e-10)  # an isometry keeps every angle
    scales = depth_scales(profile)
    assert scales.xi_grad == pytest.approx(-1 / math.log(sigma_w**2), rel=1e-8)


def test_pair_correlation_is_one_for_identical_inputs_and_near_zero_for_independent_ones():
    net, points = linear_net(width=64, layers=3, sigma_w=1.0)
    same = torch.randn(8, 64).repeat_interleave(2, dim=0)
    assert measure(net, same, torch.zeros(16, dtype=torch.long), points=points).c == pytest.approx([1, 1, 1])
    independent = torch.randn(2000, 64, generator=torch.Generator().manual_seed(1))
    c = measure(net, independent, torch.zeros(2000, dtype=torch.long), points=points).c
    assert max(abs(v) for v in c) < 0.01


@pytest.mark.parametrize("xi", [0.7, 4.0, 25.0])
def test_the_fit_recovers_a_planted_depth_scale_across_stage_jumps(xi):
    """Geometric decays with a jump at each stage change (a pool) and multiplicative noise."""
    rng = np.random.default_rng(0)
    stages = [layer * 3 // 60 for layer in range(60)]
    jump = {0: 1.0, 1: 0.25, 2: 0.05}
    grad = [math.sqrt(math.exp(layer / xi) * jump[s] * math.exp(rng.normal(0, 0.01))) for layer, s in enumerate(stages)]
    c = [0.8 - 0.6 * math.exp(-layer / xi) for layer in range(60)]
    profile = Profile(q=[1.0] * 60, c=c, grad=grad, stage=stages)
    scales = depth_scales(profile)
    assert scales.xi_grad == pytest.approx(xi, rel=0.02)
    if xi < 10:  # c has converged within the first three quarters: the tail's mean is c*
        assert scales.xi_c == pytest.approx(xi, rel=0.02) and scales.c_star == pytest.approx(0.8, abs=1e-4)
    assert decay_rate([1.0], [0]) is None  # one point: no slope


# --- delta-orthogonal init ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c_out,c_in", [(16, 16), (8, 4), (4, 8)])
def test_delta_orthogonal_kernel_is_an_orthogonal_centre_tap_times_the_gain(c_out, c_in):
    weight = delta_orthogonal_(torch.empty(c_out, c_in, 3, 3), gain=1.3)
    centre = weight[:, :, 1, 1].double()
    rest = weight.clone()
    rest[:, :, 1, 1] = 0
    assert torch.count_nonzero(rest) == 0
    scale = 1.3**2 * max(c_out / c_in, 1)  # widening layers keep the mean square per channel
    gram = centre.T @ centre if c_out >= c_in else centre @ centre.T
    torch.testing.assert_close(gram, scale * torch.eye(min(c_out, c_in), dtype=torch.float64), rtol=0, atol=1e-5)


def test_delta_orthogonal_tanh_at_criticality_keeps_q_and_the_gradient_over_100_layers():
    """At (gain, sigma_b) on the critical line (sigma_b = 0.05) and inputs at the fixed point, q^l and the gradient
    norm stay within a factor of 2 over 100 blocks; the original's N(0, 0.05) loses q by 100x within 5."""
    sigma_b = 0.05
    sigma_w2 = critical_sigma_w2(sigma_b**2, "tanh")
    q_star = fixed_length(sigma_w2, sigma_b**2, "tanh")
    for seed in range(2):
        torch.manual_seed(seed)
        blocks = [DepthBlock(16, 16, "tanh", batch_norm=False, residual=False) for _ in range(100)]
        for block in blocks:
            delta_orthogonal_conv(block.conv, math.sqrt(sigma_w2), sigma_b)
        net = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
        x = torch.tanh(math.sqrt(q_star) * torch.randn(32, 16, 4, 4))  # a layer's output at the fixed point
        profile = measure(net, x, torch.randint(0, 10, (32,)), dtype=torch.float32)
        assert max(profile.q) / min(profile.q) < 2, seed
        assert max(profile.grad) / min(profile.grad) < 2, seed
        for block in blocks:
            nn.init.normal_(block.conv.weight, 0.0, 0.05)
            nn.init.zeros_(block.conv.bias)
        naive = measure(net, x, torch.randint(0, 10, (32,)), dtype=torch.float32)
        assert naive.q[0] / naive.q[5] > 100 and min(naive.grad) < 1e-6 * max(naive.grad)  # (float32: to 0)


def test_depth_cnn_init_settings_and_their_refusals():
    net = DepthCNN(depth=6, activation="tanh", init="delta_orthogonal", gain="critical", bias_std=0.05)
    assert net.settings["gain"] == pytest.approx(math.sqrt(critical_sigma_w2(0.0025, "tanh")))
    assert net.weight_variance(net.features[0].conv) == pytest.approx(net.settings["gain"] ** 2)
    assert net.at_depth(9).settings["gain"] == net.settings["gain"]
    assert all(isinstance(why, str) for why in net.recyclable_units().values())  # recycling refused, with a reason
    assert DepthCNN(depth=6, init_std=0.05).weight_variance(net.features[1].conv) == pytest.approx(9 * 4 * 0.05**2)
    with pytest.raises(ValueError, match="gain is the delta-orthogonal"):
        DepthCNN(depth=6, gain=2.0)
    with pytest.raises(ValueError, match="init must be"):
        DepthCNN(depth=6, init="orthogonal")


# --- the search started from a prediction ---------------------------------------------------------------------------


def stub(boundary: int, calls: list):
    def train(depth: int, seed: int):
        calls.append(depth)
        return (0.05, 0.05) if depth <= boundary else (0.9, 0.9)

    return train


def guided_search(boundary: int, upper: int, guess: int, calls: list | None = None):
    plan = search_plan(upper, guess=guess)
    train = stub(boundary, calls if calls is not None else [])
    return run_searches({"net": plan}, lambda _, depth, seed: train(depth, seed))[0]


@pytest.mark.parametrize("upper", [24, 120, 450])
def test_a_search_from_any_guess_finds_the_boundary(upper):
    for boundary in range(0, upper + 1, 3):
        for guess in {3, boundary, boundary + 12, max(boundary - 30, 3), upper, 10 * upper}:
            result = guided_search(boundary, upper, guess)
            assert result.deepest == boundary and result.confirmed, (boundary, guess)
            assert len(result.trials) == trials_needed(upper, boundary, guess=guess)


def test_a_right_prediction_needs_two_probes_and_the_confirmation():
    calls = []
    result = guided_search(84, 120, 84, calls)
    assert calls == [84, 87, 84, 87] and result.guess == 84  # probes at 84 and 87, then both confirmed
    assert trials_needed(120, 84, guess=84) == 4 < trials_needed(120, 84) == 8


# --- the subcommand -------------------------------------------------------------------------------------------------


def test_propagate_writes_tables_plots_and_mean_field_beside_the_measurement(in_tmp):
    root = make_mnist(in_tmp / "data", n_train=160)
    results = cli(
        "propagate", "--config", CONFIGS / "depth" / "tanh.yaml", *small_splits(root), "--depths", "[6,12]",
        "--seeds", "2", "--pairs", "8", *QUIET,
    )  # fmt: skip
    folder = Path(results.trainer.log_dir)
    layers = list(csv.DictReader((folder / "propagation.csv").open()))
    assert {(r["depth"], r["seed"]) for r in layers} == {("6", "0"), ("6", "1"), ("12", "0"), ("12", "1")}
    assert sum(r["depth"] == "12" and r["seed"] == "0" for r in layers) == 12  # one row per block
    theory = list(csv.DictReader((folder / "mean_field.csv").open()))
    assert [float(r["sigma_w2"]) for r in theory] == pytest.approx([9 * c * 0.05**2 for c in (1, 4, 4, 8, 8, 16)])
    # measured beside the theory on each stage's main row: the gradient shrinks per block as chi_1 = sigma_w^2 says
    measured = [(float(r["chi_1"]), float(r["measured_chi_1"])) for r in theory if r["measured_chi_1"]]
    assert len(measured) == 3 and all(0.5 * chi < seen < 2 * chi for chi, seen in measured), measured
    text = (folder / "propagation.md").read_text()
    assert "| depth/tanh | 12 |" in text and (folder / "propagation_tanh.png").is_file()
    scales = list(csv.DictReader((folder / "depth_scales.csv").open()))
    assert all(0 < float(r["xi_grad"]) < 1.5 for r in scales)  # deep in the ordered phase: under a layer or so


def test_propagate_refuses_depths_without_a_slope_to_fit(in_tmp, capsys):
    from tests.conftest import cli_error

    root = make_mnist(in_tmp / "data")
    error = cli_error(
        "propagate", "--config", CONFIGS / "depth" / "tanh.yaml", *small_splits(root), "--depths", "[3,12]", *QUIET,
        capsys=capsys,
    )  # fmt: skip
    assert "depths must be multiples of 3 of at least 6" in error


def test_search_from_the_prediction_starts_where_propagate_predicts(in_tmp, capsys):
    """`--bracket predicted`: the untrained net's prediction (tanh with N(0, 0.05): k = 3) is the first probe, and
    the report puts it beside the depth found, the original's and the trials either way would need."""
    root = make_mnist(in_tmp / "data", n_train=160)
    cli(
        "search", "--config", CONFIGS / "depth" / "tanh.yaml", *small_splits(root), "--upper", "12",
        "--config", CONFIGS / "presets" / "search_from_prediction.yaml", "--probe_depth", "12",
        "--trainer.max_steps", "2", *QUIET,
    )  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"predicted deepest trainable k = 3 \(3\.\.\d\) at initialisation; starting at k = 3", out)
    assert out.index("depth/tanh k=   3 seed=0") < out.index("depth/tanh k=", out.index("depth/tanh k=   3") + 1)
    table = next(line for line in out.splitlines() if line.startswith("| depth/tanh | 12 |"))
    cells = [c.strip() for c in table.strip("|").split("|")]
    assert cells[2].startswith("3 (3..") and cells[4] == "3"  # predicted, and the original's k
    assert int(cells[6]) <= int(cells[7])  # trials taken from the prediction <= a binary search's


def planted(depth_scales_per_seed: list[tuple[float, float]], depths=(12,)) -> Prediction:
    """A variant measured at `depths`, one seed per (xi_c, xi_grad) pair, with flat profiles of each depth."""
    result = Prediction("planted")
    for depth in depths:
        for seed, (xi_c, xi_grad) in enumerate(depth_scales_per_seed):
            profile = Profile(q=[1.0] * depth, c=[0.5] * depth, grad=[1.0] * depth, stage=[0] * depth)
            result.measured.append(Measured(depth, seed, profile, DepthScales(xi_c, xi_grad, 0.5)))
    return result


def test_the_summary_says_which_scale_binds_in_each_seed(tmp_path):
    """Seeds bound by different scales: medians of xi_c (20) and xi_grad (8) would say 48, the prediction is the
    median of 6 min(xi_c, xi_grad) = 30; the summary shows the binding scale and its value per seed."""
    result = planted([(5.0, 9.0), (20.0, 3.0), (40.0, 8.0)])
    row = summary_rows([result])[0]
    assert row["predicted"] == 30 == 6 * row["xi"] and row["binds"] == "xi_c xi_grad xi_grad"
    text = write_propagation([result], tmp_path)["md"].read_text()
    assert "| planted | 12 | 30 (18..48) | xi_c 5, xi_grad 3, xi_grad 8 |" in text
    assert "| 12 | 1 | 20 | 3 | xi_grad |" in text


def test_the_profile_plot_colours_each_seed_and_labels_the_depths_in_every_panel():
    result = planted([(5.0, 9.0), (20.0, 3.0)], depths=(6, 12))
    figure = profile_figure(result)
    for ax in figure.axes:
        assert {t.get_text() for t in ax.get_legend().get_texts()} == {"k=6", "k=12", "seed 0", "seed 1"}
        colours = {}
        for m, line in zip(result.measured, ax.lines, strict=True):
            assert len(line.get_xdata()) == m.depth
            colours.setdefault(m.seed, set()).add(line.get_color())
        assert all(len(c) == 1 for c in colours.values()) and colours[0] != colours[1]
