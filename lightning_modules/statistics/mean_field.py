"""Mean-field signal propagation of a plain deep net at initialisation (Poole et al., 2016; Schoenholz et al.,
2017), from the integrals of spec 06 (no Lightning import).

A layer with weights of variance sigma_w^2 / fan_in and biases of variance sigma_b^2 maps the length q of its
input pre-activations and the correlation c of two inputs' pre-activations to the next layer's; their fixed
points q*, c* and the slopes there (chi_1, the correlation map's slope at c*) give the depth scales over which
a signal and its gradient survive. For a k x k conv with C_in input channels and weights N(0, s^2),
sigma_w^2 = k^2 C_in s^2, times zero padding's factor (`padded_conv_factor`) in a net of finite maps.

ReLU's integrals are closed forms (the arc-cosine kernels of Cho & Saul, 2009). Tanh's and ELU's are composite
Gauss-Legendre rules split at the kinks (ELU's at 0) and graded to the scale 1 / sqrt(q) on which phi(sqrt(q) z)
bends, in polar coordinates for the pairs: about 1e-14 relative to scipy's adaptive integrals for q from 1e-4 to
1e4 and c from -1 to 1 (tests/test_mean_field.py holds them to 1e-11 at spot points).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

PANEL_NODES = 16  # Gauss-Legendre nodes per panel
REACH = 12.0  # |z| (and r) integrated up to: the Gaussian mass beyond is below 1e-32


def _tanh(z):
    return np.tanh(z)


def _tanh_slope(z):
    return 1.0 - np.tanh(z) ** 2


def _elu(z):
    return np.where(z > 0, z, np.expm1(np.minimum(z, 0)))


def _elu_slope(z):
    return np.where(z > 0, 1.0, np.exp(np.minimum(z, 0)))


def _relu(z):
    return np.maximum(z, 0)


def _relu_slope(z):
    return (z > 0).astype(float)


PHI = {"tanh": (_tanh, _tanh_slope), "elu": (_elu, _elu_slope), "relu": (_relu, _relu_slope)}

# --- quadrature -------------------------------------------------------------------------------------------------


@functools.cache
def _legendre() -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(PANEL_NODES)


def _panels(breaks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on every panel between consecutive breaks."""
    x, w = _legendre()
    a, b = breaks[:-1, None], breaks[1:, None]
    return ((a + b) / 2 + (b - a) / 2 * x).ravel(), ((b - a) / 2 * w).ravel()


def _graded(a: float, b: float, fine: float, both_ends: bool) -> np.ndarray:
    """Breaks from a to b: panels doubling from `fine` away from a (and from b), then at most 1 wide."""
    half = (b - a) / 2 if both_ends else b - a
    steps = []
    h = min(fine, half)
    while h < min(1.0, half):
        steps.append(h)
        h *= 2
    inner_a = a + (steps[-1] if steps else 0.0)
    inner_b = b - (steps[-1] if steps and both_ends else 0.0)
    middle = np.linspace(inner_a, inner_b, max(1, math.ceil(inner_b - inner_a)) + 1)
    ends = [a + s for s in steps] + ([b - s for s in steps] if both_ends else [])
    return np.unique(np.concatenate([[a, b], ends, middle]))


def _fine(q: float) -> float:
    """The finest panel near a kink: phi(sqrt(q) z) bends over |z| of about 1 / sqrt(q)."""
    if not 0 <= q < math.inf:
        raise ValueError(f"the integrals need a finite length q >= 0, got {q}")
    return min(1.0, 0.5 / math.sqrt(q)) if q > 0 else 1.0


def gaussian_mean(f, q: float) -> float:
    """E[f(u)] for u ~ N(0, q), on the z = u / sqrt(q) line split at 0 and graded toward it."""
    half = _graded(0.0, REACH, _fine(q), both_ends=False)
    z, w = _panels(np.concatenate([-half[::-1], half[1:]]))
    return float(np.sum(w * np.exp(-z * z / 2) * f(math.sqrt(q) * z))) / math.sqrt(2 * math.pi)


def pair_mean(f, g, q: float, c: float) -> float:
    """E[f(u1) g(u2)] with u1 = sqrt(q) z1, u2 = sqrt(q) (c z1 + sqrt(1 - c^2) z2), z1, z2 independent N(0, 1).

    In polar coordinates (z1, z2) = r (cos t, sin t): u1 = sqrt(q) r cos t and u2 = sqrt(q) r cos(t - arccos c)
    change sign on four rays, so the angle is split into the wedges between them (graded toward each ray, where
    phi bends over an angle of about 1 / (sqrt(q) r)) and the radius graded toward 0."""
    t0 = math.acos(min(max(c, -1.0), 1.0))
    rays = np.sort(np.mod([math.pi / 2, 3 * math.pi / 2, t0 + math.pi / 2, t0 + 3 * math.pi / 2], 2 * math.pi))
    rays = np.append(rays, rays[0] + 2 * math.pi)
    fine_t = _fine(q) / (2 * REACH / 3)  # at the radius 2 REACH / 3 that still carries mass
    wedges = [_graded(a, b, fine_t, both_ends=True) for a, b in zip(rays[:-1], rays[1:], strict=True) if b - a > 1e-12]
    t, wt = _panels(np.unique(np.concatenate(wedges)))
    r, wr = _panels(_graded(0.0, REACH, _fine(q), both_ends=False))
    wr = wr * r * np.exp(-r * r / 2) / (2 * math.pi)
    root = math.sqrt(q) * r[:, None]
    return float(wr @ (f(root * np.cos(t)) * g(root * np.cos(t - t0))) @ wt)


# --- the maps -----------------------------------------------------------------------------------------------------


def _relu_angle(c: float) -> float:
    return math.acos(min(max(c, -1.0), 1.0))


def second_moment(q: float, activation: str) -> float:
    """E[phi(u)^2], u ~ N(0, q) (ReLU: q / 2)."""
    if activation == "relu":
        return q / 2
    phi, _ = PHI[activation]
    return gaussian_mean(lambda u: phi(u) ** 2, q)


def slope_moment(q: float, activation: str) -> float:
    """E[phi'(u)^2], u ~ N(0, q) (ReLU: 1 / 2)."""
    if activation == "relu":
        return 0.5
    _, slope = PHI[activation]
    return gaussian_mean(lambda u: slope(u) ** 2, q)


def pair_moment(q: float, c: float, activation: str) -> float:
    """E[phi(u1) phi(u2)] (ReLU: the degree-1 arc-cosine kernel, q (sin a + (pi - a) cos a) / (2 pi), a = arccos c)."""
    if activation == "relu":
        a = _relu_angle(c)
        return q * (math.sin(a) + (math.pi - a) * math.cos(a)) / (2 * math.pi)
    phi, _ = PHI[activation]
    return pair_mean(phi, phi, q, c)


def slope_pair_moment(q: float, c: float, activation: str) -> float:
    """E[phi'(u1) phi'(u2)] (ReLU: the degree-0 arc-cosine kernel, (pi - arccos c) / (2 pi))."""
    if activation == "relu":
        return (math.pi - _relu_angle(c)) / (2 * math.pi)
    _, slope = PHI[activation]
    return pair_mean(slope, slope, q, c)


def length_map(q: float, sigma_w2: float, sigma_b2: float, activation: str) -> float:
    """q^l from q^{l-1}: sigma_w^2 E[phi(sqrt(q) z)^2] + sigma_b^2."""
    return sigma_w2 * second_moment(q, activation) + sigma_b2


def correlation_map(c: float, q: float, sigma_w2: float, sigma_b2: float, activation: str) -> float:
    """c^l from c^{l-1} at the fixed length q*: (sigma_w^2 E[phi(u1) phi(u2)] + sigma_b^2) / q*."""
    return (sigma_w2 * pair_moment(q, c, activation) + sigma_b2) / q


def chi_1(q: float, sigma_w2: float, activation: str) -> float:
    """sigma_w^2 E[phi'(sqrt(q*) z)^2]: the factor by which a gradient's square norm changes per layer."""
    return sigma_w2 * slope_moment(q, activation)


def correlation_slope(c: float, q: float, sigma_w2: float, activation: str) -> float:
    """The correlation map's slope at c and the fixed length q: sigma_w^2 E[phi'(u1) phi'(u2)] (= chi_1 at c = 1)."""
    return sigma_w2 * slope_pair_moment(q, c, activation)


def fixed_length(sigma_w2: float, sigma_b2: float, activation: str) -> float:
    """q*, the stable fixed point of the length map: 0 when the signal dies, inf when it grows without bound, nan
    when every q is fixed (ReLU at sigma_w^2 = 2 without bias).

    ReLU's map is linear, q' = sigma_w^2 q / 2 + sigma_b^2. Without bias, tanh and ELU (slope 1 at 0) lose the
    signal when sigma_w^2 <= 1 (at 1 only as a power law, q^l ~ 1 / (2 l) for tanh); ELU's q grows without bound
    when sigma_w^2 >= 2 (q' > sigma_w^2 q / 2). Otherwise q* is the root of q' - q, bracketed by doubling."""
    if activation == "relu":
        if sigma_w2 == 2 and sigma_b2 == 0:
            return math.nan
        return math.inf if sigma_w2 >= 2 else sigma_b2 / (1 - sigma_w2 / 2)
    if sigma_b2 == 0 and sigma_w2 <= 1:
        return 0.0
    if activation == "elu" and sigma_w2 >= 2:
        return math.inf

    def gap(q: float) -> float:
        return length_map(q, sigma_w2, sigma_b2, activation) - q

    low = sigma_b2 if sigma_b2 > 0 else 1e-12
    high = max(2 * low, 1.0)
    while gap(high) > 0:
        high *= 2
        if high > 1e12:
            return math.inf
    return brentq(gap, low, high, xtol=1e-15, rtol=1e-13) if gap(low) > 0 else low


def fixed_correlation(q: float, sigma_w2: float, sigma_b2: float, activation: str) -> float:
    """c* in the chaotic phase (chi_1 > 1; in the ordered phase and at its edge c = 1 attracts). The map is convex
    on [0, 1] (a power series in c with non-negative coefficients), at least c at 0 and below c just under 1, where
    its slope is chi_1 > 1: one root in [0, 1), 0 for an odd activation without bias."""

    def gap(c: float) -> float:
        return correlation_map(c, q, sigma_w2, sigma_b2, activation) - c

    if gap(0.0) <= 1e-13:
        return 0.0
    below = 0.5
    while gap(1 - below) >= 0:
        below /= 2
    return float(brentq(gap, 0.0, 1 - below, xtol=1e-13))


# --- the fixed points and depth scales ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MeanField:
    """The fixed points and depth scales of one layer's maps (xi in layers; inf at criticality or where the decay
    is a power law). c* is nan where the correlation map is frozen (every c fixed); `regime` says why a value is
    not an ordinary fixed point's."""

    sigma_w2: float
    sigma_b2: float
    q_star: float
    c_star: float
    chi_1: float
    chi_c: float  # the correlation map's slope at c* (relative to the length's change where q* is 0 or inf)
    xi_c: float
    xi_grad: float
    regime: str = ""


def depth_scale(slope: float) -> float:
    """-1 / log(slope): the layers over which a geometric factor `slope` changes a quantity by e (inf at 1)."""
    if slope <= 0:
        return 0.0
    if abs(math.log(slope)) < 1e-12:
        return math.inf
    return abs(1.0 / math.log(slope))


def _power_law_correlation(sigma_w2: float, sigma_b2: float, q: float, chi: float, regime: str) -> MeanField:
    """c -> 1 with slope 1 (no depth scale: 1 - c^l falls as a power law); the gradient at the rate chi."""
    return MeanField(sigma_w2, sigma_b2, q, 1.0, chi, 1.0, math.inf, depth_scale(chi), regime)


def _relu_mean_field(sigma_w2: float, sigma_b2: float) -> MeanField:
    """ReLU in closed form: chi_1 = sigma_w^2 / 2 at every q. With a bias and sigma_w^2 < 2, q* = sigma_b^2 /
    (1 - sigma_w^2 / 2) and c* = 1 attracts at the rate chi_c = chi_1. Without one, ReLU is homogeneous: the
    correlation map, (sin a + (pi - a) cos a) / pi, does not depend on q or sigma_w, has slope 1 at c = 1 and
    brings c to 1 as a power law; q shrinks (sigma_w^2 < 2), is kept (2: He init, critical) or grows (> 2) by
    sigma_w^2 / 2 per layer, as does the gradient's square norm. With sigma_w^2 >= 2 q grows without bound (linearly
    at 2 with a bias), the bias fades against it, and the correlation again tends to 1 as a power law."""
    chi = sigma_w2 / 2
    q = fixed_length(sigma_w2, sigma_b2, "relu")
    if math.isnan(q):
        return _power_law_correlation(sigma_w2, sigma_b2, q, chi, "q kept (every q fixed); c -> 1 as a power law")
    if math.isinf(q):
        return _power_law_correlation(sigma_w2, sigma_b2, q, chi, "q grows; c -> 1 as a power law")
    if q == 0:
        return _power_law_correlation(sigma_w2, sigma_b2, q, chi, "q* = 0; c -> 1 as a power law")
    return MeanField(sigma_w2, sigma_b2, q, 1.0, chi, chi, depth_scale(chi), depth_scale(chi))


def mean_field(sigma_w2: float, sigma_b2: float, activation: str) -> MeanField:
    """q*, c*, chi_1 and the depth scales of a layer with these variances, from the spec's integrals.

    Where q* = 0 (tanh and ELU without bias, sigma_w^2 <= 1) the net is linear near 0: the gradient changes by
    chi_1 = sigma_w^2 phi'(0)^2 per layer, but the correlation map tends to the identity (for tanh it moves c by
    O(q^2) per layer, for ELU by O(q), and q shrinks geometrically): c stops where the first layers left it,
    so c* is undefined (nan), its slope is 1 and xi_c is infinite. Where ELU's q* is infinite, ReLU's limit holds."""
    if activation not in PHI:
        raise ValueError(f"mean field is defined here for {sorted(PHI)}, not {activation!r}")
    if activation == "relu":
        return _relu_mean_field(sigma_w2, sigma_b2)
    _, slope = PHI[activation]
    q = fixed_length(sigma_w2, sigma_b2, activation)
    if q == 0.0:
        chi = sigma_w2 * float(slope(np.array(0.0))) ** 2
        return MeanField(sigma_w2, sigma_b2, q, math.nan, chi, 1.0, math.inf, depth_scale(chi), "q* = 0; c frozen")
    if math.isinf(q):
        return _power_law_correlation(sigma_w2, sigma_b2, q, sigma_w2 / 2, "q grows; c -> 1 as a power law")
    chi = chi_1(q, sigma_w2, activation)
    c_star = 1.0 if chi <= 1 + 1e-9 else fixed_correlation(q, sigma_w2, sigma_b2, activation)  # ordered: c = 1 attracts
    chi_c = correlation_slope(c_star, q, sigma_w2, activation)
    regime = "critical: c -> 1 as a power law" if abs(chi - 1) < 1e-9 else ""
    return MeanField(sigma_w2, sigma_b2, q, c_star, chi, chi_c, depth_scale(chi_c), depth_scale(chi), regime)


def critical_sigma_w2(sigma_b2: float, activation: str) -> float:
    """The weight variance sigma_w^2 at which chi_1 = 1 for this bias variance (the edge between order and chaos):
    the root of chi_1(q*(sigma_w^2)) - 1, which grows with sigma_w^2 (ELU's lies below 2, where its q* is finite
    and chi_1 > 1)."""
    if activation == "relu":
        return 2.0  # chi_1 = sigma_w^2 / 2 at any q*
    if sigma_b2 == 0:
        return 1.0  # slope 1 at 0: chi_1 = sigma_w^2 at q* = 0

    def gap(sigma_w2: float) -> float:
        return chi_1(fixed_length(sigma_w2, sigma_b2, activation), sigma_w2, activation) - 1

    return brentq(gap, 1.0, 2.0 - 1e-6 if activation == "elu" else 20.0, xtol=1e-13)


def padded_conv_factor(size: int, kernel: int = 3) -> float:
    """Zero padding's factor on q per layer of a `kernel` x `kernel` conv ('same' padding, stride 1, i.i.d. taps)
    on a size x size map: q at a position is the mean of its input's q over the taps, those outside the image
    counting 0, and after a few layers q takes the stencil's leading profile, which this factor scales per layer.
    It is the square of the 1-D stencil's largest eigenvalue, (1 + 2 cos(pi / (size + 1))) / 3 for 3 taps; the
    gradient, through the transposed stencil, shrinks by the same factor."""
    reach = kernel // 2
    index = np.arange(size)
    stencil = (abs(index[:, None] - index[None, :]) <= reach) / kernel
    return float(np.linalg.eigvalsh(stencil)[-1] ** 2)
