"""Per-layer summaries of unit statistics (research line 3): the variance distribution and PCA.

`variance_summary` reduces the per-unit activation variances of one layer to the study's numbers:
their sum, the zero-variance count, the Shapiro-Wilk test and two mixture fits. `pca_summary`
reduces a sample of pre-activation vectors to explained variance and reconstruction distances.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict

import numpy as np
import torch
from scipy import stats

from lightning_modules.statistics.mixtures import ExpNormalFit, GammaMixtureFit, fit_exp_normal, fit_two_gammas


def variance_summary(var: np.ndarray, zero_tol: float = 0.0, min_fit_units: int = 32) -> dict[str, float]:
    """Sum, zero-variance count (<= zero_tol), Shapiro-Wilk (W, p) and both mixture fits of one layer's variances.

    Both fits use the units above `zero_tol`: zero-variance (dead) units are a point mass at 0 that
    no continuous component can fit (the exponential's rate would run off to infinity); `zero_var`
    counts them. Five mixture parameters need data: below `min_fit_units` live units the fits are
    skipped. A statistic that cannot be computed (too few or identical values) is NaN.
    """
    var = np.asarray(var, dtype=np.float64)
    summary = {"var_sum": float(var.sum()), "zero_var": float((var <= zero_tol).sum())}
    w = p = math.nan
    if len(var) >= 3 and np.ptp(var) > 0:
        with warnings.catch_warnings():  # scipy warns that p is approximate above 5,000 units
            warnings.simplefilter("ignore")
            w, p = stats.shapiro(var)
    summary.update(shapiro_w=float(w), shapiro_p=float(p))
    alive = var[var > zero_tol]
    for prefix, fit, kind in (("expnorm", fit_exp_normal, ExpNormalFit), ("gammas", fit_two_gammas, GammaMixtureFit)):
        fields = [f for f in kind.__dataclass_fields__ if f not in ("loglik", "iterations")]
        try:
            if len(alive) < min_fit_units:
                raise ValueError(f"{len(alive)} live units: too few to fit")
            values = asdict(fit(alive))
        except ValueError:
            values = dict.fromkeys(fields, math.nan)
        summary.update({f"{prefix}_{f}": float(values[f]) for f in fields})
    return summary


def pca_summary(rows: torch.Tensor, ks: tuple[int, ...] | list[int]) -> tuple[np.ndarray, dict[str, float]]:
    """Explained-variance ratio per principal component of `rows` (samples x units), and for each k
    the mean Euclidean distance of a centred sample to its projection on the top-k components."""
    x = rows.double()
    x = x - x.mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    energy = s.square()
    ratio = (energy / energy.sum().clamp(min=1e-300)).cpu().numpy()
    summary = {"pca_ev1": float(ratio[0]) if len(ratio) else math.nan}
    cumulative = np.cumsum(ratio)
    summary["pca_k90"] = float(np.searchsorted(cumulative, 0.9) + 1) if len(ratio) else math.nan
    for k in ks:
        top = vh[: min(k, len(vh))]
        residual = x - (x @ top.T) @ top
        summary[f"pca_recon_k{k}"] = float(residual.norm(dim=1).mean())
    return ratio, summary
