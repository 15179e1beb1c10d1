"""Weight spectra on the dashboard (spec 08): per weighted layer the spectral norm, stable rank and the power-law
alpha of the spectrum's tail, at epoch ends, from the weights alone (no data)."""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl

from callbacks.activation_observer import log_now, logged_step, network_of, wandb_loggers
from callbacks.figures import spectral_density_figure
from callbacks.training_dynamics import weighted_layers
from lightning_modules.errors import require
from lightning_modules.run.run_folder import run_folder
from lightning_modules.statistics.spectra import Spectrum, spectrum

MAX_PLOTTED = 9  # layers in the default figure: evenly spaced through the net, first and last included


class WeightSpectra(pl.Callback):
    """Logs `spectra/<layer>/{spectral_norm, stable_rank, alpha, alpha_ks, alpha_tail, weighted_alpha}` and their
    means over layers `spectra/{stable_rank, alpha, weighted_alpha}_mean` (alpha's over the layers with a fit: a
    spectrum of fewer than `min_tail` positive eigenvalues has none, NaN) every `every_n_epochs` training epochs, or
    with `on: validation` at every validation of a fit (a task stream's task ends). At the end of fit it draws the
    last spectra of the `plot` layers (fnmatch patterns; default up to 9 evenly spaced) to `weight_spectra.png` in
    the run folder and W&B. Under DDP the weights are alike on every rank: rank 0 measures and logs."""

    def __init__(
        self,
        layers: tuple[str, ...] = ("*",),
        every_n_epochs: int = 1,
        on: Literal["epoch", "validation"] = "epoch",
        min_tail: int = 10,
        plot: tuple[str, ...] | None = None,
    ) -> None:
        """
        Args:
            layers: the weighted layers measured, fnmatch patterns on their names (as TrainingDynamics names them).
            every_n_epochs: with `on: epoch`, measure after every N-th training epoch.
            on: `epoch` (training epoch ends) or `validation` (every validation of a fit).
            min_tail: the fewest eigenvalues a power-law tail may hold (Clauset et al.'s fit grows unreliable below).
            plot: the layers drawn in the figure, fnmatch patterns; None: up to 9 evenly spaced measured layers.
        """
        require("positive", every_n_epochs=every_n_epochs, min_tail=min_tail)
        self.layers, self.every_n_epochs, self.on, self.min_tail, self.plot = layers, every_n_epochs, on, min_tail, plot
        self.last: dict[str, Spectrum] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on == "epoch" and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.measure(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on == "validation" and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.measure(trainer, pl_module)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        layers = weighted_layers(network_of(pl_module), tuple(self.layers))
        self.last = {name: spectrum(module.weight, self.min_tail) for name, module in layers.items()}
        log_now(trainer, spectra_metrics(self.last))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = run_folder(trainer)  # on every rank (a collective under DDP)
        if trainer.is_global_zero and folder is not None and self.last:
            self.draw(trainer, folder)

    def draw(self, trainer: pl.Trainer, folder: Path) -> None:
        """The spectral densities of the plotted layers: a PNG in the run folder and an image in W&B."""
        title = f"weight spectra at step {trainer.global_step}"
        image = spectral_density_figure(plotted(self.last, self.plot), title, folder / "weight_spectra.png")
        for logger in wandb_loggers(trainer):
            logger.log_image("spectra/densities", [str(image)], step=logged_step(trainer))


def spectra_metrics(spectra: dict[str, Spectrum]) -> dict[str, float]:
    """The logged values of a measurement: per layer and their means over layers (alpha's over the finite ones)."""
    values: dict[str, float] = {}
    for name, s in spectra.items():
        values |= {
            f"spectra/{name}/spectral_norm": s.spectral_norm,
            f"spectra/{name}/stable_rank": s.stable_rank,
            f"spectra/{name}/alpha": s.fit.alpha,
            f"spectra/{name}/alpha_ks": s.fit.ks,
            f"spectra/{name}/alpha_tail": float(s.fit.tail),
            f"spectra/{name}/weighted_alpha": s.weighted_alpha,
        }
    means = {
        "stable_rank": [s.stable_rank for s in spectra.values()],
        "alpha": [s.fit.alpha for s in spectra.values()],
        "weighted_alpha": [s.weighted_alpha for s in spectra.values()],
    }
    for key, all_values in means.items():
        finite = [v for v in all_values if math.isfinite(v)]
        values[f"spectra/{key}_mean"] = sum(finite) / len(finite) if finite else math.nan
    return values


def plotted(spectra: dict[str, Spectrum], patterns: tuple[str, ...] | None) -> dict[str, Spectrum]:
    """The layers the figure draws: those matching `patterns`, or up to MAX_PLOTTED evenly spaced."""
    names = list(spectra)
    if patterns is not None:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    elif len(names) > MAX_PLOTTED:
        names = [names[round(i * (len(names) - 1) / (MAX_PLOTTED - 1))] for i in range(MAX_PLOTTED)]
    return {name: spectra[name] for name in names}
