"""The depth search of research line 1: the deepest trainable k = 3m, by binary search over m.

Pure logic, with training injected as `train(depth, seed) -> (train_err, val_err)`, so the search
is testable with a stub and reusable with any net that can be rebuilt at another depth. Trials are
recorded one by one in results.csv (atomically), and a restarted search reuses those already there.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lightning_modules.files import atomic_savefig, atomic_write, atomic_write_csv

TrainFn = Callable[[int, int], tuple[float, float]]


@dataclass
class Trial:
    """One trained depth and seed. Errors are NaN when the loss diverged."""

    variant: str
    depth: int
    seed: int
    train_err: float
    val_err: float
    trainable: bool | None  # None until every seed of its depth has trained
    phase: str  # "search" or "confirm"


@dataclass
class SearchResult:
    """All trials of one variant, the deepest trainable depth found, and whether confirmation agreed."""

    variant: str
    upper: int
    deepest: int  # 0 when not even k=3 trains
    confirmed: bool
    trials: list[Trial] = field(default_factory=list)


def is_trainable(val_errs: list[float], max_error: float) -> bool:
    """A depth is trainable when the mean validation error over its seeds is below `max_error` (NaN: diverged, not)."""
    return all(not math.isnan(e) for e in val_errs) and sum(val_errs) / len(val_errs) < max_error


def search_depth(
    train: TrainFn,
    upper: int,
    seeds: int = 1,
    max_error: float = 0.2,
    first_seed: int = 0,
    variant: str = "net",
    step: int = 3,
    log: TrialLog | None = None,
) -> SearchResult:
    """Binary search over m in [1, upper // step] for the largest trainable k = step * m, then confirm.

    Confirmation trains the two consecutive depths around the boundary (k and k + step) again with
    fresh seeds: the boundary is confirmed when k still trains and k + step still does not. Each trial
    goes into `log` as soon as it is trained; a trial already in it is not trained again.
    """
    if upper < step:
        raise ValueError(f"upper must be at least {step}, got {upper}")
    trials: list[Trial] = []
    log = log if log is not None else TrialLog()

    def run(m: int, phase: str, seed0: int) -> bool:
        depth = step * m
        done = []
        for seed in range(seed0, seed0 + seeds):
            trial = log.get(variant, depth, seed)
            if trial is None:
                trial = log.add(Trial(variant, depth, seed, *train(depth, seed), None, phase))
            done.append(trial)
        ok = is_trainable([t.val_err for t in done], max_error)
        for trial in done:
            trial.trainable = ok
        log.save()
        trials.extend(done)
        return ok

    lo, hi = 0, upper // step + 1  # invariant: lo trainable (0 by convention), hi not (upper+1 by convention)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if run(mid, "search", first_seed):
            lo = mid
        else:
            hi = mid
    confirm_seed = first_seed + seeds  # seeds the search did not use
    confirmed = True
    if lo >= 1:
        confirmed &= run(lo, "confirm", confirm_seed)
    if lo + 1 <= upper // step:
        confirmed &= not run(lo + 1, "confirm", confirm_seed)
    return SearchResult(variant, upper, step * lo, confirmed, trials)


class TrialLog:
    """The trials of a search so far, by (variant, depth, seed), saved to a CSV file after each one."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.trials: dict[tuple[str, int, int], Trial] = {}
        if path is not None and path.is_file():
            for row in csv.DictReader(path.open(newline="")):
                trainable = {"True": True, "False": False}.get(row["trainable"])
                trial = Trial(
                    row["variant"], int(row["depth"]), int(row["seed"]), float(row["train_err"]),
                    float(row["val_err"]), trainable, row["phase"],
                )  # fmt: skip
                self.trials[(trial.variant, trial.depth, trial.seed)] = trial

    def get(self, variant: str, depth: int, seed: int) -> Trial | None:
        return self.trials.get((variant, depth, seed))

    def add(self, trial: Trial) -> Trial:
        self.trials[(trial.variant, trial.depth, trial.seed)] = trial
        self.save()
        return trial

    def save(self) -> None:
        if self.path is not None and self.trials:
            write_trials(list(self.trials.values()), self.path)


def write_trials(trials: list[Trial], path: Path) -> None:
    """One CSV row per trial (NaN errors: diverged), written atomically."""
    atomic_write_csv(path, list(asdict(trials[0])), (asdict(t) for t in trials))


def describe(result: SearchResult, max_error: float) -> str:
    """The search's outcome in a line: the deepest trainable depth and whether it was confirmed, or that none trained."""
    if result.deepest == 0:
        first = sorted(
            (t for t in result.trials if t.depth == min(t.depth for t in result.trials)), key=lambda t: t.seed
        )
        errs = [t.val_err for t in first]
        how = "diverged" if any(math.isnan(e) for e in errs) else f"has val err {sum(errs) / len(errs):.2f}"
        return f"no depth trainable: k = {first[0].depth} {how} (trainable: below {max_error:.2f})"
    verdict = "confirmed" if result.confirmed else "NOT confirmed: the boundary is noisy, try more --seeds"
    return f"deepest trainable k = {result.deepest} ({verdict})"


def write_results(results: list[SearchResult], max_error: float, folder: Path) -> dict[str, Path]:
    """Write results.csv, results.md (per-trial table and per-variant summary) and error_vs_depth.png."""
    folder.mkdir(parents=True, exist_ok=True)
    trials = [t for r in results for t in r.trials]
    paths = {"csv": folder / "results.csv", "md": folder / "results.md", "plot": folder / "error_vs_depth.png"}
    write_trials(trials, paths["csv"])
    lines = [
        f"Trainable: mean validation error over seeds below {max_error:.0%}.",
        "",
        "| variant | search upper bound | max trainable k | confirmed |",
        "| --- | ---: | ---: | --- |",
    ]
    lines += [
        f"| {r.variant} | {r.upper} | {r.deepest or 'none'} | {'yes' if r.confirmed else 'no'} |" for r in results
    ]
    lines += [
        "",
        "| variant | k | seed | train err | val err | trainable | phase |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    lines += [
        f"| {t.variant} | {t.depth} | {t.seed} | {t.train_err:.4f} | {t.val_err:.4f} | {'yes' if t.trainable else 'no'} | {t.phase} |"
        for t in sorted(trials, key=lambda t: (t.variant, t.depth, t.phase, t.seed))
    ]
    atomic_write(paths["md"], "\n".join(lines) + "\n")
    plot_errors(results, max_error, paths["plot"])
    return paths


def plot_errors(results: list[SearchResult], max_error: float, path: Path) -> None:
    """Validation error against depth, one series per variant; diverged runs drawn at error 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        points = sorted((t.depth, 1.0 if math.isnan(t.val_err) else t.val_err) for t in r.trials)
        ax.plot([d for d, _ in points], [e for _, e in points], "o", alpha=0.7, label=f"{r.variant} (k*={r.deepest})")
    ax.axhline(max_error, color="grey", linestyle="--", label=f"threshold {max_error:.0%}")
    ax.set(
        xlabel="depth k (conv layers)",
        ylabel="validation error after training",
        ylim=(0, 1.02),
        title="Trainability against depth",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
