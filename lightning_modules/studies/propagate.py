"""The `propagate` subcommand (research line 1, spec 06): each variant's net at each depth, untrained, fed pairs of
the config's training images; q^l, c^l and the gradient norm at every block, the fitted depth scales and the
deepest trainable depth they predict, beside the mean-field values of the plain variants. Writes
propagation.csv, depth_scales.csv, mean_field.csv, propagation.md and one plot per variant into the run folder.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_modules.errors import ConfigError, require
from lightning_modules.run.config_files import config_name, net_from_config
from lightning_modules.run.files import atomic_savefig, atomic_write, atomic_write_csv
from lightning_modules.statistics.mean_field import PHI, MeanField, mean_field
from lightning_modules.statistics.propagation import (
    DepthScales,
    Profile,
    decay_rate,
    depth_scales,
    measure,
    predicted_depth,
)
from lightning_modules.studies.study import Study

DEPTHS = (12, 24, 48, 96)
FILES = {
    "layers": "propagation.csv",
    "scales": "depth_scales.csv",
    "mean_field": "mean_field.csv",
    "md": "propagation.md",
}


@dataclass
class Measured:
    """One (depth, seed) net's profile and the depth scales fitted to it."""

    depth: int
    seed: int
    profile: Profile
    scales: DepthScales

    @property
    def predicted(self) -> float:
        return self.scales.predicted_depth


@dataclass
class StageTheory:
    """Mean-field values of the convs of one stage with one fan-in, at the conv's sigma_w^2 times zero padding's
    factor on q at the stage's map size; beside them, on the stage's main row (its most convs), what the deepest
    nets measured there (median over seeds): q and c at the stage's last block and chi_1 from the squared
    gradient's decay over the stage's blocks."""

    stage: int
    size: int  # the map's height and width
    c_in: int
    convs: int
    sigma_w2: float  # the conv's own: 9 C_in s^2, or gain^2
    padding: float  # zero padding's factor on q per conv at this size (1: none)
    values: MeanField  # at sigma_w2 * padding
    measured: dict[str, float] = field(default_factory=dict)


@dataclass
class Prediction:
    """A variant's measurements and its predicted deepest trainable depth: the median over seeds at the deepest
    depth measured, with their range; `theory` for the plain variants (None where mean-field theory does not
    apply: batch norm, residual connections, another net)."""

    variant: str
    measured: list[Measured] = field(default_factory=list)
    theory: list[StageTheory] | None = None
    why_no_theory: str = ""
    seconds: float = 0.0  # wall time of the measurements

    def at_deepest(self) -> list[Measured]:
        deepest = max(m.depth for m in self.measured)
        return [m for m in self.measured if m.depth == deepest]

    @property
    def predicted(self) -> float:
        return statistics.median(m.predicted for m in self.at_deepest())

    @property
    def spread(self) -> tuple[float, float]:
        values = [m.predicted for m in self.at_deepest()]
        return min(values), max(values)

    def describe(self) -> str:
        """`81 (49..92)`: the prediction and its range over seeds."""
        low, high = self.spread
        return f"{self.predicted:.0f} ({low:.0f}..{high:.0f})"

    def theory_predicted(self) -> float | None:
        """6 min(xi_c, xi_grad) of mean-field theory, each scale's rate (1 / xi) averaged over the net's convs."""
        if not self.theory:
            return None
        convs = sum(s.convs for s in self.theory)
        rate_c = sum(s.convs / s.values.xi_c if s.values.xi_c > 0 else math.inf for s in self.theory) / convs
        rate_g = sum(s.convs / s.values.xi_grad if s.values.xi_grad > 0 else math.inf for s in self.theory) / convs
        return predicted_depth(1 / rate_c if rate_c else math.inf, 1 / rate_g if rate_g else math.inf)


def trainable_depth(predicted: float, step: int = 3) -> int:
    """A predicted depth as the search's grid point at or below it (at least `step`)."""
    if not math.isfinite(predicted):
        return 10**9
    return max(step, int(predicted // step) * step)


def input_pairs(datamodule: pl.LightningDataModule, pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2 * pairs training images drawn without replacement (seeded), normalised as training sees them."""
    loader = datamodule.eval_dataloader("train")
    size = len(loader.split)
    if size < 2 * pairs:
        raise ConfigError(f"propagate needs {2 * pairs} training samples for {pairs} pairs; the split has {size}")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(size, generator=generator)[: 2 * pairs].to(loader.split.labels.device)
    return loader.batch(index)


def theory_of(net: nn.Module) -> tuple[list[StageTheory] | None, str]:
    """The mean-field values per (stage, fan-in) of a plain depth net, or why the theory does not apply."""
    settings = getattr(net, "settings", {})
    if not (hasattr(net, "weight_variance") and hasattr(net, "padding_factor")):
        return None, f"{type(net).__name__} is not a depth net"
    if settings.get("batch_norm") or settings.get("residual"):
        return None, "batch norm and residual connections lie outside the plain theory"
    if settings.get("activation") not in PHI:
        return None, f"no mean-field integrals for {settings.get('activation')!r}"
    rows: dict[tuple[int, int], StageTheory] = {}
    sigma_b2 = float(settings.get("bias_std", 0.0)) ** 2
    stage, size = 0, settings["input_size"]
    for module in net.features:
        if isinstance(module, nn.AvgPool2d):
            stage, size = stage + 1, size // 2
            continue
        conv = module.conv
        key = (stage, conv.in_channels)
        if key not in rows:
            sigma_w2, padding = net.weight_variance(conv), net.padding_factor(size)
            values = mean_field(sigma_w2 * padding, sigma_b2, settings["activation"])
            rows[key] = StageTheory(stage, size, conv.in_channels, 0, sigma_w2, padding, values)
        rows[key].convs += 1
    return list(rows.values()), ""


def probe(
    name: str,
    net: nn.Module,
    datamodule: pl.LightningDataModule,
    depths: list[int],
    seeds: list[int],
    pairs: int,
    device: torch.device,
) -> Prediction:
    """Measure a variant's net at every depth and seed (`at_depth` from `seed`, as `fit --seed_everything seed`
    would initialise it; its input pairs drawn with the same seed)."""
    result = Prediction(name)
    start = time.perf_counter()
    for depth in depths:
        for seed in seeds:
            pl.seed_everything(seed, verbose=False)
            deep = net.at_depth(depth).to(device)
            x, y = input_pairs(datamodule, pairs, seed)
            profile = measure(deep, x.to(device), y.to(device))
            result.measured.append(Measured(depth, seed, profile, depth_scales(profile)))
    result.seconds = time.perf_counter() - start
    result.theory, result.why_no_theory = theory_of(net.at_depth(max(depths)))
    for stage in result.theory or []:
        main = max((s for s in result.theory if s.stage == stage.stage), key=lambda s: s.convs)
        if stage is main:
            stage.measured = measured_stage(result.at_deepest(), stage.stage)
    return result


def measured_stage(measured: list[Measured], stage: int) -> dict[str, float]:
    """q and c at a stage's last block, and chi_1 = exp(-slope) of log |g|^2 over its blocks, median over seeds."""
    values: dict[str, list[float]] = {"q": [], "c": [], "chi_1": []}
    for m in measured:
        layers = [i for i, s in enumerate(m.profile.stage) if s == stage]
        values["q"].append(m.profile.q[layers[-1]])
        values["c"].append(m.profile.c[layers[-1]])
        rate = decay_rate([m.profile.grad[i] ** 2 for i in layers], [stage] * len(layers))
        values["chi_1"].append(math.exp(-rate) if rate is not None else math.nan)
    return {key: statistics.median(v) for key, v in values.items()}


def depth_nets(
    study: Study, model: pl.LightningModule, variants: dict[str, int] | None, upper: int | None = None
) -> list[tuple[str, nn.Module, int | None]]:
    """The nets a depth study rebuilds at other depths, with their search bounds: each variant config's (named for
    its file), else the model's own (bound `upper`). Each must have `at_depth(k)`."""
    if variants:
        jobs = [(config_name(path), net_from_config(path), bound) for path, bound in variants.items()]
    else:
        jobs = [(study.run_name, model.net, upper)]
    for _, net, _ in jobs:
        if not hasattr(net, "at_depth"):
            raise ConfigError(f"{type(net).__name__} has no at_depth(k): {study.name} must rebuild it at other depths")
    return jobs


def check_depths(depths: list[int]) -> list[int]:
    """Depths sorted; each a multiple of 3 and at least 6 (two convs per stage: a slope to fit)."""
    bad = [d for d in depths if d < 6 or d % 3]
    if bad:
        raise ConfigError(f"depths must be multiples of 3 of at least 6 (two convs per stage), got {bad}")
    return sorted(set(depths))


def run_propagate(
    study: Study,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    depths: list[int] | None,
    seeds: int,
    pairs: int,
    variants: dict[str, int] | None,
) -> list[Prediction]:
    """The `propagate` subcommand (its arguments are documented on the Trainer's method)."""
    study.require_one_process("each net is measured once, in one forward and one backward pass")
    require("positive", seeds=seeds, pairs=pairs)
    if not callable(getattr(datamodule, "eval_dataloader", None)):
        raise ConfigError(f"propagate needs one of the in-memory datamodules; {type(datamodule).__name__} is not")
    depths = check_depths(list(depths or DEPTHS))
    study.set_up(datamodule, "fit")
    first_seed = pl.seed_everything(verbose=False)
    device = study.trainer.strategy.root_device
    results = []
    for name, net, _ in depth_nets(study, model, variants):
        result = probe(name, net, datamodule, depths, list(range(first_seed, first_seed + seeds)), pairs, device)
        print(f"propagate {name}: predicted deepest trainable k = {result.describe()} from k = {max(depths)}")
        results.append(result)
    paths = write_propagation(results, study.folder)
    print(paths["md"].read_text())
    print(f"propagate results: {', '.join(str(p) for p in paths.values())}")
    study.report(
        tables={
            "propagate/predicted": summary_rows(results),
            "propagate/depth_scales": scale_rows(results),
            "propagate/mean_field": theory_rows(results),
        },
        images={f"propagate/{r.variant}": paths[r.variant] for r in results},
    )
    return results


def summary_rows(results: list[Prediction]) -> list[dict]:
    rows = []
    for r in results:
        deepest = r.at_deepest()
        rows.append({
            "variant": r.variant,
            "probe_depth": deepest[0].depth,
            "predicted": r.predicted,
            "predicted_min": r.spread[0],
            "predicted_max": r.spread[1],
            "xi": statistics.median(m.scales.binding for m in deepest),
            "binds": " ".join(m.scales.binds for m in deepest),
            "mean_field_predicted": r.theory_predicted(),
            "seconds": r.seconds,
        })  # fmt: skip
    return rows


def scale_rows(results: list[Prediction]) -> list[dict]:
    return [
        {"variant": r.variant, "depth": m.depth, "seed": m.seed, **asdict(m.scales), "binds": m.scales.binds,
         "predicted": m.predicted}
        for r in results for m in r.measured
    ]  # fmt: skip


def theory_rows(results: list[Prediction]) -> list[dict]:
    return [
        {"variant": r.variant, "stage": s.stage, "size": s.size, "c_in": s.c_in, "convs": s.convs,
         **asdict(s.values), "sigma_w2": s.sigma_w2, "padding": s.padding,
         **{f"measured_{k}": s.measured.get(k, "") for k in ("q", "c", "chi_1")}}
        for r in results for s in (r.theory or [])
    ]  # fmt: skip


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "inf"
    if math.isnan(value):
        return "-"
    return f"{value:.{digits}g}"


def write_propagation(results: list[Prediction], folder: Path) -> dict[str, Path]:
    """The CSV files, propagation.md and a plot per variant; returns their paths (plots under the variant's name)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {key: folder / name for key, name in FILES.items()}
    layer_rows = [
        {"variant": r.variant, "depth": m.depth, "seed": m.seed, "layer": layer + 1, "stage": m.profile.stage[layer],
         "q": m.profile.q[layer], "c": m.profile.c[layer], "grad_norm": m.profile.grad[layer]}
        for r in results for m in r.measured for layer in range(len(m.profile))
    ]  # fmt: skip
    for key, rows in (("layers", layer_rows), ("scales", scale_rows(results)), ("mean_field", theory_rows(results))):
        if rows:
            atomic_write_csv(paths[key], list(rows[0]), rows)
    lines = [
        "Predicted deepest trainable depth: 6 min(xi_c, xi_grad) (Schoenholz et al., 2017), the median over seeds at",
        "the deepest depth probed (range over seeds), and per seed the scale that binds (the smaller) and its value;",
        "mean-field: the same from the spec's integrals, each rate averaged over the net's convs. Seconds: every depth",
        "and seed of the variant, measured.",
        "",
        "| variant | probe depth | predicted k (seeds) | binding scale per seed | mean-field predicted k | seconds |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for r, row in zip(results, summary_rows(results), strict=True):
        binding = ", ".join(f"{m.scales.binds} {fmt(m.scales.binding)}" for m in r.at_deepest())
        lines.append(
            f"| {row['variant']} | {row['probe_depth']} | {fmt(row['predicted'])} "
            f"({fmt(row['predicted_min'])}..{fmt(row['predicted_max'])}) | {binding} "
            f"| {fmt(row['mean_field_predicted'])} | {row['seconds']:.1f} |"
        )
    for r in results:
        lines += ["", f"## {r.variant}", "", "| depth | seed | xi_c | xi_grad | binds | c* (measured) | predicted k |",
                  "| ---: | ---: | ---: | ---: | --- | ---: | ---: |"]  # fmt: skip
        lines += [
            f"| {m.depth} | {m.seed} | {fmt(m.scales.xi_c)} | {fmt(m.scales.xi_grad)} | {m.scales.binds} "
            f"| {fmt(m.scales.c_star)} | {fmt(m.predicted)} |"
            for m in r.measured
        ]
        if r.theory:
            lines += ["", "Mean field per stage and fan-in at sigma_w^2 x padding (zero padding's factor on q per conv at "
                      "the stage's map size), and measured at the deepest depth (stage's last block; chi_1 from its "
                      "gradient's decay). c* is '-' where the correlation map is frozen (q* = 0: c stays where the "
                      "first layers leave it, so xi_c is inf).", "",
                      "| stage | size | C_in | convs | sigma_w^2 | padding | sigma_b^2 | q* | c* | chi_1 | xi_c | xi_grad "
                      "| measured q | measured c | measured chi_1 | regime |",
                      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
                      "| ---: | --- |"]  # fmt: skip
            for s in r.theory:
                seen = [fmt(s.measured.get(k)) if s.measured else "" for k in ("q", "c", "chi_1")]
                lines.append(
                    f"| {s.stage + 1} | {s.size} | {s.c_in} | {s.convs} | {fmt(s.sigma_w2)} | {fmt(s.padding)} "
                    f"| {fmt(s.values.sigma_b2)} | {fmt(s.values.q_star)} | {fmt(s.values.c_star)} "
                    f"| {fmt(s.values.chi_1, 6)} | {fmt(s.values.xi_c)} | {fmt(s.values.xi_grad)} | {' | '.join(seen)} "
                    f"| {s.values.regime} |"
                )
        else:
            lines += ["", f"No mean-field values: {r.why_no_theory}."]
        paths[r.variant] = folder / f"propagation_{r.variant.rsplit('/', 1)[-1]}.png"
        plot_profiles(r, paths[r.variant])
    atomic_write(paths["md"], "\n".join(lines) + "\n")
    return paths


LINE_STYLES = ("-", "--", ":", "-.")


def profile_figure(result: Prediction):
    """q^l, c^l and the gradient norm against layer: one colour per seed, one line style per depth, and the legend
    of both in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    depths = sorted({m.depth for m in result.measured})
    seeds = sorted({m.seed for m in result.measured})
    colour = {seed: plt.cm.tab10(i % 10) for i, seed in enumerate(seeds)}
    style = {depth: LINE_STYLES[i % len(LINE_STYLES)] for i, depth in enumerate(depths)}
    for m in result.measured:
        layers = range(1, len(m.profile) + 1)
        for ax, values in zip(axes, (m.profile.q, m.profile.c, m.profile.grad), strict=True):
            ax.plot(layers, values, color=colour[m.seed], linestyle=style[m.depth], alpha=0.8, linewidth=1.2)
    keys = [Line2D([], [], color="black", linestyle=style[d], label=f"k={d}") for d in depths]
    keys += [Line2D([], [], color=colour[seed], label=f"seed {seed}") for seed in seeds]
    for ax, title, log in zip(axes, ("length q^l", "pair correlation c^l", "gradient norm"), (True, False, True),
                              strict=True):  # fmt: skip
        ax.set(xlabel="layer l", title=title, yscale="log" if log else "linear")
        ax.legend(handles=keys, fontsize=7, ncol=2, framealpha=0.8)
    fig.suptitle(f"{result.variant}: signal propagation at initialisation")
    fig.tight_layout()
    return fig


def plot_profiles(result: Prediction, path: Path) -> None:
    """`profile_figure` written to `path`."""
    import matplotlib.pyplot as plt

    fig = profile_figure(result)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
