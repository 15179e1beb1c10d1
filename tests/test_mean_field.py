"""Mean-field theory (spec 06): the quadrature against closed forms and an adaptive integral, ReLU's closed forms,
the frozen correlation map without bias, and zero padding's factor on a conv's q."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.optimize import brentq
from scipy.stats import norm
from torch import nn

from lightning_modules.statistics.mean_field import (
    PHI,
    chi_1,
    correlation_slope,
    critical_sigma_w2,
    gaussian_mean,
    length_map,
    mean_field,
    padded_conv_factor,
    pair_mean,
    pair_moment,
    second_moment,
)
from lightning_modules.statistics.propagation import decay_rate, measure

REACH = 12.0  # |z| integrated up to here: the Gaussian mass beyond is below 1e-32


def density(z: float) -> float:
    """The standard normal density (scipy.stats.norm.pdf is slow on scalars)."""
    return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def adaptive_mean(f, q: float) -> float:
    """E[f(u)], u ~ N(0, q), by scipy's adaptive quad on each side of 0."""
    root = math.sqrt(q)
    return sum(
        quad(lambda z: float(f(root * z)) * density(z), a, b, epsabs=1e-14, epsrel=1e-13, limit=400)[0]
        for a, b in ((-REACH, 0.0), (0.0, REACH))
    )


def adaptive_pair_mean(f, g, q: float, c: float) -> float:
    """E[f(u1) g(u2)] by nested adaptive quad, the inner integral split where its argument changes sign."""
    root, s = math.sqrt(q), math.sqrt(1 - c * c)

    def inner(z1: float) -> float:
        kink = -c * z1 / s
        return sum(
            quad(lambda z2: float(g(root * (c * z1 + s * z2))) * density(z2), a, b, epsabs=1e-14, limit=200)[0]
            for a, b in ((-REACH, kink), (kink, REACH))
        )

    return sum(
        quad(lambda z1: float(f(root * z1)) * density(z1) * inner(z1), a, b, epsabs=1e-13, limit=200)[0]
        for a, b in ((-REACH, 0.0), (0.0, REACH))
    )


# --- the quadrature -----------------------------------------------------------------------------------------------


def test_relu_integrals_by_quadrature_are_the_arc_cosine_kernels():
    """The polar rule split at the kinks, on ReLU, against Cho & Saul's closed forms (degree 1 and 0)."""
    relu, step = PHI["relu"]
    for q in (0.3, 4.0, 250.0):
        assert gaussian_mean(lambda u: relu(u) ** 2, q) == pytest.approx(q / 2, rel=1e-13)
        for c in (-0.9, 0.0, 0.5, 0.99):
            a = math.acos(c)
            kernel = q * (math.sin(a) + (math.pi - a) * math.cos(a)) / (2 * math.pi)
            assert pair_mean(relu, relu, q, c) == pytest.approx(kernel, rel=1e-12)
            assert pair_mean(step, step, q, c) == pytest.approx((math.pi - a) / (2 * math.pi), rel=1e-12)


def elu_second_moment(q: float) -> float:
    """E[elu(u)^2] = q / 2 + 1 / 2 - 2 e^{q/2} Phi(-sqrt q) + e^{2q} Phi(-2 sqrt q), u ~ N(0, q)."""
    r = math.sqrt(q)
    return q / 2 + 0.5 - 2 * math.exp(q / 2) * norm.cdf(-r) + math.exp(2 * q) * norm.cdf(-2 * r)


def elu_chi_1(q: float, sigma_w2: float) -> float:
    """sigma_w^2 E[elu'(u)^2] = sigma_w^2 (1 / 2 + e^{2q} Phi(-2 sqrt q))."""
    return sigma_w2 * (0.5 + math.exp(2 * q) * norm.cdf(-2 * math.sqrt(q)))


@pytest.mark.parametrize("q", [0.05, 0.37, 2.0, 20.0])
def test_elu_integrals_match_their_closed_forms(q):
    assert length_map(q, 1.3, 0.1, "elu") == pytest.approx(1.3 * elu_second_moment(q) + 0.1, rel=1e-12)
    assert chi_1(q, 1.3, "elu") == pytest.approx(elu_chi_1(q, 1.3), rel=1e-12)


def test_elu_chi_1_at_its_fixed_point_is_exact():
    """At (sigma_w^2, sigma_b^2) = (1.2, 0.05): q* and chi_1 from the closed forms, about 0.8820 (80 Gauss-Hermite
    nodes across the kink gave 0.8790)."""
    q_star = brentq(lambda q: 1.2 * elu_second_moment(q) + 0.05 - q, 0.05, 10, xtol=1e-15)
    values = mean_field(1.2, 0.05, "elu")
    assert values.q_star == pytest.approx(q_star, rel=1e-10)
    assert values.chi_1 == pytest.approx(elu_chi_1(q_star, 1.2), rel=1e-10)
    assert values.chi_1 == pytest.approx(0.8820, abs=1e-4)


@pytest.mark.parametrize("q", [2.0, 5.0, 10.0, 100.0])
def test_tanh_integrals_match_an_adaptive_integral_at_large_q(q):
    """The chaotic side of the phase diagram, where phi(sqrt(q) z) bends over 1 / sqrt(q)."""
    tanh, slope = PHI["tanh"]
    assert length_map(q, 1.0, 0.0, "tanh") == pytest.approx(adaptive_mean(lambda u: tanh(u) ** 2, q), rel=1e-12)
    assert chi_1(q, 1.0, "tanh") == pytest.approx(adaptive_mean(lambda u: slope(u) ** 2, q), rel=1e-12)


@pytest.mark.parametrize("activation,q,c", [("tanh", 5.0, 0.5), ("tanh", 10.0, 0.3), ("elu", 2.0, 0.7)])
def test_pair_integrals_match_a_nested_adaptive_integral(activation, q, c):
    phi, slope = PHI[activation]
    assert pair_moment(q, c, activation) == pytest.approx(adaptive_pair_mean(phi, phi, q, c), rel=1e-11)
    expected_slope = 1.3 * adaptive_pair_mean(slope, slope, q, c)
    assert correlation_slope(c, q, 1.3, activation) == pytest.approx(expected_slope, rel=1e-11)


# --- ReLU ---------------------------------------------------------------------------------------------------------


def test_relu_mean_field_in_closed_form():
    """chi_1 = sigma_w^2 / 2 at every q; without bias q shrinks (< 2), is kept (2: He init, critical) or grows (> 2)
    by that factor, and c tends to 1 as a power law (xi_c inf); with a bias and sigma_w^2 < 2, ordinary fixed points."""
    for sigma_w2 in (1.0, 1.5):
        values = mean_field(sigma_w2, 0.0, "relu")
        assert values.q_star == 0 and values.c_star == 1 and values.chi_1 == pytest.approx(sigma_w2 / 2)
        assert values.xi_grad == pytest.approx(-1 / math.log(sigma_w2 / 2)) and values.xi_c == math.inf
    he = mean_field(2.0, 0.0, "relu")
    assert he.chi_1 == 1 and he.xi_grad == math.inf and he.xi_c == math.inf and math.isnan(he.q_star)
    loud = mean_field(2.5, 0.0, "relu")
    assert loud.q_star == math.inf and loud.chi_1 == pytest.approx(1.25)
    assert loud.xi_grad == pytest.approx(1 / math.log(1.25)) and loud.xi_c == math.inf
    biased = mean_field(1.0, 0.1, "relu")
    assert biased.q_star == pytest.approx(0.2) and biased.c_star == 1 and biased.chi_c == pytest.approx(0.5)
    assert biased.xi_c == biased.xi_grad == pytest.approx(1 / math.log(2))
    assert critical_sigma_w2(0.1, "relu") == 2.0 and mean_field(2.0, 0.1, "relu").chi_1 == 1


def relu_mlp(width: int, layers: int, sigma_w2: float, seed: int = 0) -> nn.Sequential:
    """Linear (weights N(0, sigma_w^2 / width), no bias) -> ReLU, `layers` times, then a linear head."""
    torch.manual_seed(seed)
    modules = []
    for _ in range(layers):
        linear = nn.Linear(width, width, bias=False)
        nn.init.normal_(linear.weight, 0.0, math.sqrt(sigma_w2 / width))
        modules += [linear, nn.ReLU()]
    return nn.Sequential(*modules, nn.Linear(width, 10))


@pytest.mark.parametrize("sigma_w2", [1.0, 2.0, 2.5])
def test_a_relu_net_changes_q_and_the_gradient_by_the_closed_form_chi_1(sigma_w2):
    """Measured on a 512-wide ReLU net: per layer, q and the squared gradient change by sigma_w^2 / 2 (He init:
    kept), and the pair correlation climbs toward 1 (it is not frozen)."""
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    profile = measure(relu_mlp(512, 16, sigma_w2), x, torch.randint(0, 10, (64,)))
    chi = mean_field(sigma_w2, 0.0, "relu").chi_1
    assert math.exp(decay_rate(profile.q, [0] * 16)) == pytest.approx(chi, rel=0.05)
    assert math.exp(-decay_rate([g * g for g in profile.grad], [0] * 16)) == pytest.approx(chi, rel=0.05)
    assert profile.c[-1] > profile.c[1] + 0.1


# --- no bias: the frozen correlation map --------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["tanh", "elu"])
def test_without_bias_below_criticality_the_correlation_map_is_frozen(activation):
    """q* = 0: the gradient changes by sigma_w^2 per layer, but c has no fixed point to approach (c* undefined,
    xi_c inf): the normalised correlation map tends to the identity as q -> 0 (tanh: c' - c = -(2/3) q^2 c (1 - c^2)
    + o(q^2), from phi(u) = u - u^3 / 3 + 2 u^5 / 15)."""
    values = mean_field(0.5, 0.0, activation)
    assert values.q_star == 0 and math.isnan(values.c_star) and values.xi_c == math.inf and values.chi_c == 1
    assert values.xi_grad == pytest.approx(-1 / math.log(0.5))
    for q in (1e-2, 1e-3):
        moved = [pair_moment(q, c, activation) / second_moment(q, activation) - c for c in (0.3, 0.45, 0.8)]
        assert max(abs(m) for m in moved) < 0.02 * q
        if activation == "tanh":
            expected = [-2 / 3 * q * q * c * (1 - c * c) for c in (0.3, 0.45, 0.8)]
            np.testing.assert_allclose(moved, expected, rtol=0.1)


def test_a_wide_tanh_net_without_bias_keeps_its_pair_correlation():
    """Measured: 28 layers of a 1000-wide tanh net at sigma_w^2 = 0.8, no bias: 1 - c stays near 0.55, moving only
    by the finite width's noise, as the frozen map says (a c* = 1 at xi_c = -1 / log 0.8 = 4.5 layers would have
    closed it by a factor e^6)."""
    assert mean_field(0.8, 0.0, "tanh").xi_c == math.inf
    torch.manual_seed(0)
    modules = []
    for _ in range(28):
        linear = nn.Linear(1000, 1000, bias=False, dtype=torch.float64)
        nn.init.normal_(linear.weight, 0.0, math.sqrt(0.8 / 1000))
        modules += [linear, nn.Tanh()]
    net = nn.Sequential(*modules, nn.Linear(1000, 10, dtype=torch.float64))
    base = torch.randn(16, 1000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    other = torch.randn(16, 1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pairs = torch.stack([base, 0.45 * base + math.sqrt(1 - 0.45**2) * other], 1).flatten(0, 1)  # c = 0.45
    c = measure(net, pairs, torch.zeros(32, dtype=torch.long)).c
    assert all(0.5 < 1 - v < 0.62 for v in c) and max(c) - min(c) < 0.05


# --- zero padding -------------------------------------------------------------------------------------------------


def test_padded_conv_factor_by_hand_on_small_maps():
    """On a 1 x 1 map only the centre tap is inside (1/9); on 2 x 2 every position sees 2 x 2 of 9 taps (4/9); on
    3 x 3 the 1-D stencil (1/3) [[1, 1, 0], [1, 1, 1], [0, 1, 1]] has eigenvector (1, sqrt 2, 1) and eigenvalue
    (1 + sqrt 2) / 3. Larger maps: (1 + 2 cos(pi / (n + 1)))^2 / 9."""
    assert padded_conv_factor(1) == pytest.approx(1 / 9)
    assert padded_conv_factor(2) == pytest.approx(4 / 9)
    assert padded_conv_factor(3) == pytest.approx((1 + math.sqrt(2)) ** 2 / 9)
    for n, rounded in ((28, 0.99), (14, 0.97), (7, 0.90)):
        assert padded_conv_factor(n) == pytest.approx((1 + 2 * math.cos(math.pi / (n + 1))) ** 2 / 9)
        assert padded_conv_factor(n) == pytest.approx(rounded, abs=0.005)


def test_a_deep_linear_padded_conv_net_shrinks_q_by_the_padding_factor():
    """Convs N(0, 1 / (9 C)) (sigma_w^2 = 1) on a 7 x 7 map, identity activation: after the border's profile has
    formed, q shrinks per layer by the padding factor (0.90), not 1."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(32, 32, 3, padding=1, bias=False, dtype=torch.float64) for _ in range(24)]
    for conv in layers:
        nn.init.normal_(conv.weight, 0.0, math.sqrt(1 / (9 * 32)))
    points = [nn.Identity() for _ in layers]
    net = nn.Sequential(*[m for pair in zip(layers, points, strict=True) for m in pair], nn.Flatten(),
                        nn.Linear(32 * 49, 10, dtype=torch.float64))  # fmt: skip
    x = torch.randn(16, 32, 7, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q = measure(net, x, torch.zeros(16, dtype=torch.long), points=points).q
    assert math.exp(decay_rate(q[8:], [0] * 16)) == pytest.approx(padded_conv_factor(7), rel=0.03)


def test_elu_critical_line_lies_below_the_variance_where_its_length_explodes():
    """ELU's q* is infinite from sigma_w^2 = 2 on; with a bias its chi_1 = 1 lies below, at a finite q*."""
    for sigma_b2 in (0.01, 10.0):
        sigma_w2 = critical_sigma_w2(sigma_b2, "elu")
        values = mean_field(sigma_w2, sigma_b2, "elu")
        assert 1 < sigma_w2 < 2 and math.isfinite(values.q_star) and values.chi_1 == pytest.approx(1, abs=1e-9)
    exploding = mean_field(2.5, 0.1, "elu")  # q grows: ReLU's limit, chi_1 = sigma_w^2 / 2
    assert exploding.q_star == math.inf and exploding.chi_1 == pytest.approx(1.25) and exploding.xi_c == math.inf
