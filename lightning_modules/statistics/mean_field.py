"""Mean-field signal propagation of a plain deep net at initialisation (Poole et al., 2016; Schoenholz et al.,
2017), from the integrals of spec 06 by Gauss-Hermite quadrature (no Lightning import).

A layer with weights of variance sigma_w^2 / fan_in and biases of variance sigma_b^2 maps the length q of its
input pre-activations and the correlation c of two inputs' pre-activations to the next layer's; their fixed
points q*, c* and the slopes there (chi_1, the correlation map's slope at c*) give the depth scales over which
a signal and its gradient survive. For a k x k conv with C_in input channels and weights N(0, s^2),
sigma_w^2 = k^2 C_in s^2.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

NODES = 80  # Gauss-Hermite nodes per dimension: the spec's integrals to better than 1e-8


def _tanh(z):
    return np.tanh(z)


def _tanh_slope(z):
    return 1.0 / np.cosh(z) ** 2


def _elu(z):
    return np.where(z > 0, z, np.expm1(np.minimum(z, 0)))


def _elu_slope(z):
    return np.where(z > 0, 1.0, np.exp(np.minimum(z, 0)))


def _relu(z):
    return np.maximum(z, 0)


def _relu_slope(z):
    return (z > 0).astype(float)


PHI = {"tanh": (_tanh, _tanh_slope), "elu": (_elu, _elu_slope), "relu": (_relu, _relu_slope)}


@functools.cache
def _gauss(n: int = NODES) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights for E[f(z)], z ~ N(0, 1): sum_i w_i f(x_i) (computed once per n: the root finders call
    the integrals hundreds of times)."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return x, w / math.sqrt(2 * math.pi)


@functools.cache
def _gauss_2d(n: int = NODES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The product rule for E[f(z1, z2)], z1, z2 independent N(0, 1): nodes z1, z2 and weights on an n x n grid."""
    x, w = _gauss(n)
    z1, z2 = np.meshgrid(x, x, indexing="ij")
    return z1, z2, np.outer(w, w)


def gaussian_mean(f, n: int = NODES) -> float:
    """E[f(z)] for z ~ N(0, 1)."""
    x, w = _gauss(n)
    return float(np.sum(w * f(x)))


def pair_mean(f, g, q: float, c: float, n: int = NODES) -> float:
    """E[f(u1) g(u2)] with u1 = sqrt(q) z1, u2 = sqrt(q) (c z1 + sqrt(1 - c^2) z2), z1, z2 independent N(0, 1)."""
    z1, z2, weights = _gauss_2d(n)
    s = math.sqrt(q)
    u1 = s * z1
    u2 = s * (c * z1 + math.sqrt(max(1.0 - c * c, 0.0)) * z2)
    return float(np.sum(weights * f(u1) * g(u2)))


def length_map(q: float, sigma_w2: float, sigma_b2: float, activation: str) -> float:
    """q^l from q^{l-1}: sigma_w^2 E[phi(sqrt(q) z)^2] + sigma_b^2."""
    phi, _ = PHI[activation]
    return sigma_w2 * gaussian_mean(lambda z: phi(math.sqrt(q) * z) ** 2) + sigma_b2


def fixed_length(sigma_w2: float, sigma_b2: float, activation: str) -> float:
    """q*, the stable fixed point of the length map: 0 when the signal dies, inf when it grows without bound.

    Without bias, tanh and ELU (slope 1 at 0) lose the signal when sigma_w^2 <= 1 (at 1 only as a power law,
    q^l ~ 1 / (2 l) for tanh); ReLU's map is linear, q^l = (sigma_w^2 / 2)^l q^0 + ... . Otherwise q* is the
    root of q' - q, bracketed by doubling."""
    if activation == "relu":
        if sigma_w2 >= 2:
            return math.inf
        return sigma_b2 / (1 - sigma_w2 / 2)
    if sigma_b2 == 0 and sigma_w2 <= 1:
        return 0.0

    def gap(q: float) -> float:
        return length_map(q, sigma_w2, sigma_b2, activation) - q

    low = sigma_b2 if sigma_b2 > 0 else 1e-12
    high = max(2 * low, 1.0)
    while gap(high) > 0:
        high *= 2
        if high > 1e12:
            return math.inf
    return brentq(gap, low, high, xtol=1e-15, rtol=1e-13) if gap(low) > 0 else low


def correlation_map(c: float, q: float, sigma_w2: float, sigma_b2: float, activation: str) -> float:
    """c^l from c^{l-1} at length q*: (sigma_w^2 E[phi(u1) phi(u2)] + sigma_b^2) / q*."""
    phi, _ = PHI[activation]
    return (sigma_w2 * pair_mean(phi, phi, q, c) + sigma_b2) / q


def chi_1(q: float, sigma_w2: float, activation: str) -> float:
    """sigma_w^2 E[phi'(sqrt(q*) z)^2]: the factor by which a gradient's square norm changes per layer."""
    _, slope = PHI[activation]
    return sigma_w2 * gaussian_mean(lambda z: slope(math.sqrt(q) * z) ** 2)


@dataclass(frozen=True)
class MeanField:
    """The fixed points and depth scales of one layer's maps (xi in layers; inf at criticality)."""

    sigma_w2: float
    sigma_b2: float
    q_star: float
    c_star: float
    chi_1: float
    chi_c: float  # the correlation map's slope at c*
    xi_c: float
    xi_grad: float


def depth_scale(slope: float) -> float:
    """-1 / log(slope): the layers over which a geometric factor `slope` changes a quantity by e (inf at 1)."""
    if slope <= 0:
        return 0.0
    if abs(math.log(slope)) < 1e-12:
        return math.inf
    return abs(1.0 / math.log(slope))


def mean_field(sigma_w2: float, sigma_b2: float, activation: str) -> MeanField:
    """q*, c*, chi_1 and the depth scales of a layer with these variances, from the spec's integrals.

    With sigma_b = 0 and sigma_w^2 phi'(0)^2 <= 1 for tanh, the length dies (q* = 0): the net is linear near
    zero, c* = 1 and both depth scales are -1 / log chi_1 with chi_1 = sigma_w^2 phi'(0)^2."""
    if activation not in PHI:
        raise ValueError(f"mean field is defined here for {sorted(PHI)}, not {activation!r}")
    _, slope = PHI[activation]
    q = fixed_length(sigma_w2, sigma_b2, activation)
    if q == 0.0:  # the net is linear near 0: every depth scale is that of chi_1 = sigma_w^2 phi'(0)^2
        chi = sigma_w2 * float(slope(np.array(0.0))) ** 2
        return MeanField(sigma_w2, sigma_b2, q, 1.0, chi, chi, depth_scale(chi), depth_scale(chi))
    if not math.isfinite(q):  # the length explodes: no fixed point, nothing survives
        return MeanField(sigma_w2, sigma_b2, q, math.nan, math.inf, math.inf, 0.0, 0.0)
    chi = chi_1(q, sigma_w2, activation)
    c_star = 1.0 if chi <= 1 + 1e-9 else fixed_correlation(q, sigma_w2, sigma_b2, activation)  # ordered: c = 1 attracts
    chi_c = sigma_w2 * pair_mean(slope, slope, q, c_star)
    return MeanField(sigma_w2, sigma_b2, q, c_star, chi, chi_c, depth_scale(chi_c), depth_scale(chi))


def fixed_correlation(q: float, sigma_w2: float, sigma_b2: float, activation: str) -> float:
    """c* in the chaotic phase (chi_1 > 1; in the ordered phase and at its edge c = 1 attracts): the attracting
    root below 1 of c' - c (0 for an odd activation without bias), found on a grid, then refined."""

    def gap(c: float) -> float:
        return correlation_map(c, q, sigma_w2, sigma_b2, activation) - c

    grid = np.linspace(-1.0, 1 - 1e-6, 101)
    gaps = [gap(c) for c in grid]
    for i in range(len(grid) - 1, 0, -1):  # the crossing from above to below nearest 1
        if gaps[i - 1] >= -1e-14 and gaps[i] < 0:
            if abs(gaps[i - 1]) <= 1e-14:
                return float(grid[i - 1])
            return float(brentq(gap, grid[i - 1], grid[i], xtol=1e-13))
    return -1.0


def critical_sigma_w2(sigma_b2: float, activation: str) -> float:
    """The weight variance sigma_w^2 at which chi_1 = 1 for this bias variance (the edge between order and chaos):
    the root of chi_1(q*(sigma_w^2)) - 1, which grows with sigma_w^2."""
    if activation == "relu":
        return 2.0  # chi_1 = sigma_w^2 / 2 at any q*
    if sigma_b2 == 0:
        return 1.0  # slope 1 at 0: chi_1 = sigma_w^2 at q* = 0

    def gap(sigma_w2: float) -> float:
        return chi_1(fixed_length(sigma_w2, sigma_b2, activation), sigma_w2, activation) - 1

    return brentq(gap, 1.0, 20.0, xtol=1e-13)
