"""Activation statistics per unit and per layer (research line 3): variances, their distribution, PCA.

Per unit, the mean and variance of the activation over a split, streamed on the device and merged
over ranks exactly (Chan et al.). Per layer, from those variances: sum, zero-variance count,
Shapiro-Wilk, exponential + normal and two-gamma mixture fits; and PCA of the pre-activations
on a capped sample of them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from callbacks.activation_observer import (
    ActivationObserver,
    agreed_sizes,
    log_now,
    logged_step,
    wandb_loggers,
)
from callbacks.figures import variance_histograms
from lightning_modules.collectives import all_gather_rows, distributed, world_size
from lightning_modules.errors import require
from lightning_modules.run.console import say
from lightning_modules.run.files import atomic_save
from lightning_modules.run.run_folder import run_folder
from lightning_modules.statistics.moments import MomentAccumulator, Moments
from lightning_modules.statistics.unit_health import effective_rank, singular_values, srank
from lightning_modules.statistics.unit_statistics import pca_summary, variance_summary


class ActivationStats(ActivationObserver):
    """Logs `act/<layer>/<statistic>` at every validation epoch and saves the per-unit statistics.

    The statistics go straight to the loggers (and stay in `summaries`), not into `callback_metrics`.

    Files in the run folder: `activation_stats/step<N>.pt` (per layer: per-unit mean, var, count and
    the PCA explained-variance ratios; load with `torch.load(..., weights_only=True)`) at every
    observation, and `activation_variance.png` (the variance histograms) of the last one, at the end
    of fit, validate or test (drawing it every epoch would cost about a second an epoch). W&B gets
    histograms and the PCA table at every observation, and the figure at the end.
    """

    def __init__(
        self,
        pca: bool = True,
        pca_samples: int = 2048,
        pca_k: tuple[int, ...] = (1, 10, 50),
        zero_tol: float = 0.0,
        feature_rank: bool = True,
        **kwargs,
    ):
        """
        Args:
            pca: PCA of each layer's pre-activations (the input of the monitored module).
            pca_samples: at most this many pre-activation vectors per layer (split evenly over ranks): one
                per sample for linear layers, one at a random position per sample for convs.
            pca_k: report the mean reconstruction distance with the top-k components for these k.
            zero_tol: a unit whose variance is <= this counts as zero-variance.
            feature_rank: the effective rank and srank (delta 0.01) of each layer's output over the same number of
                samples as the PCA (conv: averaged over positions): both fall when units die or collapse together.
            **kwargs: which layers, over which data, how often: see `ActivationObserver`.
        """
        require("positive", pca_samples=pca_samples, **{f"pca_k[{i}]": k for i, k in enumerate(pca_k)})
        require("non_negative", zero_tol=zero_tol)
        super().__init__(**kwargs)
        self.pca, self.pca_samples, self.pca_k, self.zero_tol = pca, pca_samples, list(pca_k), zero_tol
        self.accumulators: dict[str, MomentAccumulator] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.row_counts: dict[str, int] = {}
        self.feature_rank = feature_rank
        self.features: dict[str, list[torch.Tensor]] = {}  # per layer: outputs pooled over positions, capped
        self.feature_counts: dict[str, int] = {}
        self.positions: torch.Generator | None = None
        self.summaries: dict[str, dict[str, float]] = {}
        self.means: dict[str, np.ndarray] = {}  # per unit, of the last observation (for notebooks and tests)
        self.variances: dict[str, np.ndarray] = {}
        self.title = ""

    @property
    def wants_inputs(self) -> bool:
        return self.pca

    def start(self) -> None:
        self.accumulators, self.rows, self.row_counts = {}, {}, {}
        self.features, self.feature_counts = {}, {}
        self.positions: torch.Generator | None = None  # its own generator: training's random stream stays untouched

    def observe(self, name: str, output: torch.Tensor) -> None:
        self.accumulators.setdefault(name, MomentAccumulator()).update(output)
        room = self._rows_per_rank() - self.feature_counts.get(name, 0)
        if self.feature_rank and room > 0:
            pooled = output[:room].float()
            pooled = pooled.mean(dim=tuple(range(2, pooled.dim()))) if pooled.dim() > 2 else pooled.clone()
            self.features.setdefault(name, []).append(pooled)
            self.feature_counts[name] = self.feature_counts.get(name, 0) + len(pooled)

    def observe_input(self, name: str, x: torch.Tensor) -> None:
        room = self._rows_per_rank() - self.row_counts.get(name, 0)
        if room <= 0:
            return
        x = x[:room]
        if x.dim() > 2:  # one random position per sample: (N, C, *positions) -> (N, C)
            if self.positions is None:
                self.positions = torch.Generator(device=x.device).manual_seed(0)
            flat = x.flatten(2)
            position = torch.randint(flat.shape[2], (len(flat),), device=x.device, generator=self.positions)
            x = flat[torch.arange(len(flat), device=x.device), :, position]
        self.rows.setdefault(name, []).append(x.to(torch.float32, copy=True))  # an in-place activation overwrites x
        self.row_counts[name] = self.row_counts.get(name, 0) + len(x)

    def _widths(self, name: str) -> tuple[int, int]:
        """This rank's (units, pre-activation width) of a layer: (0, 0) where it saw no sample."""
        if name not in self.accumulators:
            return 0, 0
        return len(self.accumulators[name].s1), self.rows[name][0].shape[1] if name in self.rows else 0

    def _rows_per_rank(self) -> int:
        """Each rank's share of the `pca_samples` cap."""
        return math.ceil(self.pca_samples / world_size())

    def _reduced_moments(self, names: list[str], sizes: dict, device: torch.device) -> dict[str, Moments]:
        """Every rank's moments merged in rank order: one all_gather for all layers (a layer this rank saw no sample
        of adds zero moments)."""
        zeros = Moments.zeros
        local = [(self.accumulators[n].moments() if n in self.accumulators else zeros(sizes[n][0], device)).pack()
                 for n in names]  # fmt: skip
        per_rank = all_gather_rows(torch.cat(local))
        sizes = [len(part) for part in local]
        merged: dict[str, Moments] = {}
        for rank_row in per_rank:
            for name, flat in zip(names, rank_row.split(sizes), strict=True):
                part = Moments.unpack(flat)
                merged[name] = part if name not in merged else merged[name].merge(part)
        return merged

    def _gathered_rows(self, name: str, width: int, kept: dict[str, list[torch.Tensor]], device) -> torch.Tensor:
        """This layer's sample of pre-activations (or outputs: what `kept` holds), `width` wide, from every rank (ranks
        may hold different counts, none at all among them)."""
        rows = torch.cat(kept[name]) if name in kept else torch.zeros(0, width, device=device)
        if not distributed():
            return rows
        padded = torch.zeros(self._rows_per_rank(), rows.shape[1], device=rows.device, dtype=rows.dtype)
        padded[: len(rows)] = rows
        counts = all_gather_rows(torch.tensor([len(rows)], device=rows.device))
        gathered = all_gather_rows(padded)
        return torch.cat([part[:n] for part, n in zip(gathered, counts.view(-1).tolist(), strict=True)])

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        sizes = agreed_sizes({name: self._widths(name) for name in self.layers}, device)
        names = [name for name in self.layers if sizes[name][0]]  # the same on every rank, whatever each one saw
        if not names:
            return
        moments = self._reduced_moments(names, sizes, device)
        variances = {name: moments[name].var.cpu().numpy() for name in names}
        self.means = {name: moments[name].mean.cpu().numpy() for name in names}
        self.variances = variances
        explained: dict[str, np.ndarray] = {}
        self.summaries = {}
        for name in names:  # every rank computes the same summary from the same reduced data
            units, width = sizes[name]
            self.summaries[name] = variance_summary(variances[name], self.zero_tol)
            if self.pca and width:
                explained[name], pca = pca_summary(self._gathered_rows(name, width, self.rows, device), self.pca_k)
                self.summaries[name].update(pca)
            if self.feature_rank:
                sigma = singular_values(self._gathered_rows(name, units, self.features, device))
                self.summaries[name].update(erank=effective_rank(sigma=sigma), srank=float(srank(sigma=sigma)))
        folder = run_folder(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if trainer.is_global_zero:
            self.report(trainer, folder, moments, variances, explained)

    def report(self, trainer, folder: Path | None, moments: dict, variances: dict, explained: dict) -> None:
        title = f"activation statistics ({self.split}, epoch {trainer.current_epoch}, step {logged_step(trainer)})"
        if self.print_table:
            say(self.table(title, variances))
        # straight to the loggers: a hundred keys through LightningModule.log cost 0.3 s an epoch
        log_now(
            trainer,
            {f"act/{n}/{key}": value for n, summary in self.summaries.items() for key, value in summary.items()},
        )
        if folder is None:
            return
        atomic_save(
            {
                name: {
                    "mean": torch.from_numpy(self.means[name]),  # already on the host from `finish`
                    "var": torch.from_numpy(variances[name]),
                    "count": float(moments[name].count),
                    "pca_explained": torch.from_numpy(explained[name]) if name in explained else torch.empty(0),
                }
                for name in variances
            },
            folder / "activation_stats" / f"step{logged_step(trainer):07d}.pt",
        )
        loggers = wandb_loggers(trainer)
        if loggers:
            import wandb

            for logger in loggers:
                logger.log_metrics(
                    {  # log10 of the live units' variances: raw variances crowd the bulk into one bar
                        f"act/{name}/log10_var_hist": wandb.Histogram(np.log10(var[var > self.zero_tol]))
                        for name, var in variances.items()
                        if (var > self.zero_tol).any()
                    },
                    step=logged_step(trainer),
                )
                if explained:
                    logger.log_table(
                        "act/pca_explained",
                        columns=["layer", "component", "explained_ratio"],
                        data=[[n, i + 1, float(r)] for n, ratios in explained.items() for i, r in enumerate(ratios)],
                        step=logged_step(trainer),
                    )
        self.title = title
        if trainer.state.fn != "fit":
            self.draw(trainer, folder)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = run_folder(trainer)  # on every rank (a collective under DDP)
        if trainer.is_global_zero and folder is not None and self.variances:
            self.draw(trainer, folder)

    def draw(self, trainer: pl.Trainer, folder: Path) -> None:
        """The histograms of the last observation: a PNG in the run folder and an image in W&B."""
        image = variance_histograms(self.variances, self.title, folder / "activation_variance.png")
        for logger in wandb_loggers(trainer):
            logger.log_image("act/variance_histograms", [str(image)], step=logged_step(trainer))

    COLUMNS = (
        ("var_sum", "var sum"),
        ("zero_var", "zero var"),
        ("shapiro_w", "Shapiro W"),
        ("shapiro_p", "p"),
        ("expnorm_w_exp", "exp: w"),
        ("expnorm_rate", "rate"),
        ("expnorm_mu", "normal: mu"),
        ("expnorm_sigma", "sigma"),
        ("gammas_w1", "gamma1: w"),
        ("gammas_k1", "k"),
        ("gammas_theta1", "theta"),
        ("gammas_k2", "gamma2: k"),
        ("gammas_theta2", "theta"),
        ("pca_ev1", "PCA ev1"),
        ("pca_k90", "k90"),
        ("erank", "erank"),
        ("srank", "srank"),
    )

    def table(self, title: str, variances: dict[str, np.ndarray]) -> str:
        """One row per layer: units and every summary statistic (the mixture fits ignore zero-variance units)."""
        columns = [(key, label) for key, label in self.COLUMNS if any(key in s for s in self.summaries.values())]
        width = max(len(name) for name in variances) + 2
        lines = [title, f"  {'layer':<{width}}{'units':>6}" + "".join(f"{label:>11}" for _, label in columns)]
        for name, summary in self.summaries.items():
            cells = "".join(f"{summary.get(key, math.nan):>11.4g}" for key, _ in columns)
            lines.append(f"  {name:<{width}}{len(variances[name]):>6}{cells}")
        return "\n".join(lines)
