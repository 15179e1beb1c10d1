"""Two-component mixture fits by EM, for the distribution of per-unit activation variances.

- exponential + normal: units near zero variance (almost dead) against a bulk of live units;
- two gammas: the same split with both components on the positive half-line.

Both fit on data scaled to mean 1 and scale back, so they behave the same for variances of
1e-6 or 1e3. Pure numpy/scipy: usable on any array, not only activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special


@dataclass
class ExpNormalFit:
    """w_exp * Exponential(rate) + (1 - w_exp) * Normal(mu, sigma)."""

    w_exp: float
    rate: float
    mu: float
    sigma: float
    loglik: float
    iterations: int


@dataclass
class GammaMixtureFit:
    """w1 * Gamma(k1, theta1) + (1 - w1) * Gamma(k2, theta2); component 1 has the smaller mean."""

    w1: float
    k1: float
    theta1: float
    k2: float
    theta2: float
    loglik: float
    iterations: int


def _responsibilities(log_a: np.ndarray, log_b: np.ndarray) -> tuple[np.ndarray, float]:
    """P(component a | x) and the log-likelihood, from the two weighted log densities."""
    total = np.logaddexp(log_a, log_b)
    return np.exp(log_a - total), float(total.sum())


def _log_gamma_pdf(z: np.ndarray, log_z: np.ndarray, k: float, theta: float) -> np.ndarray:
    return (k - 1) * log_z - z / theta - special.gammaln(k) - k * math.log(theta)


def _log_normal_pdf(z: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    return -0.5 * ((z - mu) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)


def _check(x: np.ndarray, positive: bool, minimum: int = 10) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).ravel()
    if len(x) < minimum or not np.all(np.isfinite(x)) or np.any(x < 0) or (positive and np.any(x == 0)):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"needs at least {minimum} finite {kind} values, got {len(x)}")
    if np.ptp(x) == 0:
        raise ValueError("all values are equal: nothing to fit")
    return x


def fit_exp_normal(x: np.ndarray, max_iter: int = 300, tol: float = 1e-6) -> ExpNormalFit:
    """EM fit of exponential + normal to non-negative data; the normal starts on the upper half."""
    x = _check(x, positive=False)
    scale = x.mean()
    z = x / scale
    lower, upper = z[z <= np.median(z)], z[z > np.median(z)]
    w, rate = 0.5, 1.0 / max(lower.mean(), 1e-6)
    mu, sigma = upper.mean(), max(upper.std(), 1e-3)
    previous = -math.inf
    for iteration in range(1, max_iter + 1):  # noqa: B007 (the count is reported)
        r, loglik = _responsibilities(np.log(w) + np.log(rate) - rate * z, np.log1p(-w) + _log_normal_pdf(z, mu, sigma))
        n_exp = r.sum()
        w = float(np.clip(n_exp / len(z), 1e-6, 1 - 1e-6))
        rate = n_exp / max((r * z).sum(), 1e-12)
        q = 1 - r
        mu = (q * z).sum() / q.sum()
        sigma = max(math.sqrt((q * (z - mu) ** 2).sum() / q.sum()), 1e-6)
        if abs(loglik - previous) <= tol * len(z):  # the mean log-likelihood has settled
            break
        previous = loglik
    loglik -= len(x) * math.log(scale)  # the density of x, not of x / scale
    return ExpNormalFit(w, float(rate / scale), float(mu * scale), float(sigma * scale), loglik, iteration)


def _gamma_shapes(means: np.ndarray, mean_logs: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Maximum-likelihood gamma shapes from E[x] and E[log x] per component: Newton on
    log k - digamma(k) = log E[x] - E[log x], from EM's previous shapes."""
    s = np.log(means) - mean_logs
    k = start.copy()
    spread = s > 0  # no spread: the limit of a very peaked gamma
    k[~spread] = 1e6
    for _ in range(50):
        step = (np.log(k) - special.digamma(k) - s) / (1 / k - special.polygamma(1, k))
        k = np.where(spread, np.maximum(k - step, 1e-8), k)
        if np.all(np.abs(step[spread]) < 1e-6 * k[spread]):  # EM moves k again next iteration
            break
    return k


def fit_two_gammas(x: np.ndarray, max_iter: int = 300, tol: float = 1e-6) -> GammaMixtureFit:
    """EM fit of two gammas to positive data; starts from moment fits of the lower and upper halves."""
    x = _check(x, positive=True)
    scale = x.mean()
    z = x / scale
    log_z = np.log(z)
    median = np.median(z)
    halves = [z[z <= median], z[z > median]]
    means = np.array([h.mean() for h in halves])
    variances = np.array([max(h.var(), 1e-12) for h in halves])
    k, theta = means**2 / variances, variances / means
    w = 0.5
    previous = -math.inf
    for iteration in range(1, max_iter + 1):  # noqa: B007 (the count is reported)
        r, loglik = _responsibilities(
            np.log(w) + _log_gamma_pdf(z, log_z, k[0], theta[0]),
            np.log1p(-w) + _log_gamma_pdf(z, log_z, k[1], theta[1]),
        )
        w = float(np.clip(r.mean(), 1e-6, 1 - 1e-6))
        weights = np.stack([r, 1 - r])
        totals = np.maximum(weights.sum(1), 1e-12)
        means, mean_logs = weights @ z / totals, weights @ log_z / totals
        k = _gamma_shapes(means, mean_logs, start=k)
        theta = means / k
        if abs(loglik - previous) <= tol * len(z):  # the mean log-likelihood has settled
            break
        previous = loglik
    first, second = (0, 1) if k[0] * theta[0] <= k[1] * theta[1] else (1, 0)  # component 1: the smaller mean
    w = w if first == 0 else 1 - w
    loglik -= len(x) * math.log(scale)
    return GammaMixtureFit(
        w,
        float(k[first]),
        float(theta[first] * scale),
        float(k[second]),
        float(theta[second] * scale),
        loglik,
        iteration,
    )
