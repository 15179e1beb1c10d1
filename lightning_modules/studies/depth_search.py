"""The depth search of research line 1 as pure logic: the deepest trainable k = 3m, by binary search over m.

Training is injected as `train(depth, seed) -> (train_err, val_err)`, so the search is testable with a stub
and reusable with any net that can be rebuilt at another depth. What is independent (the seeds of a probed
depth, the two confirmation depths, the variants) runs on a launcher, in parallel where it is Ray's. Trials
are recorded one by one (`TrialLog`, atomically), and a restarted search reuses those already there.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from lightning_modules.run.files import atomic_write_csv
from lightning_modules.studies.launchers import Failed, LocalLauncher, RayLauncher

TrainFn = Callable[[int, int], tuple[float, float]]  # (depth, seed) -> (train error, validation error)
Request = tuple[int, int, str]  # a trial a probe needs: (depth, seed, phase)
GroupFn = Callable[[str, int, list[int]], list[tuple[float, float]]]  # (variant, depth, seeds) -> each seed's errors


@dataclass
class Trial:
    """One trained depth and seed. Errors are NaN when the loss diverged or the trial failed."""

    variant: str
    depth: int
    seed: int
    train_err: float  # the trained net's error over the whole training split (evaluation mode)
    val_err: float
    trainable: bool | None  # None until every seed of its depth has trained
    phase: str  # "search" or "confirm"
    error: str = ""  # why the trial failed (it crashed twice): not trainable, and trained again by a restart
    # its wall time from submission to result (its share of the call's when its seeds trained grouped); NaN: recorded
    # before this was kept
    seconds: float = math.nan


@dataclass
class SearchResult:
    """All trials of one variant, the deepest trainable depth found, and whether confirmation agreed."""

    variant: str
    upper: int
    deepest: int  # 0 when not even k=3 trains
    confirmed: bool
    trials: list[Trial] = field(default_factory=list)
    guess: int | None = None  # the depth the search started from (a prediction), None: plain binary search


def is_trainable(val_errs: list[float], max_error: float) -> bool:
    """A depth is trainable when the mean validation error over its seeds is below `max_error` (NaN: diverged, not)."""
    return all(not math.isnan(e) for e in val_errs) and sum(val_errs) / len(val_errs) < max_error


def search_plan(
    upper: int,
    seeds: int = 1,
    max_error: float = 0.2,
    first_seed: int = 0,
    variant: str = "net",
    step: int = 3,
    guess: int | None = None,
    confirm_seeds: int | None = None,
) -> Generator[list[Request], list[Trial], SearchResult]:
    """One variant's search as a sequence of probes: yields the (depth, seed, phase) trials a probe needs,
    which can train in parallel, and is sent them back trained, in that order; returns the result.

    Binary search over m in [1, upper // step] for the largest trainable k = step * m. With a `guess` (a
    predicted depth), the bracket is found first by galloping from it: the guess, then its neighbour
    (deeper when the guess trains, shallower when not), then steps doubling away from it until the verdict
    flips; a right guess costs two probes. Confirmation then trains the two consecutive depths around the
    boundary (k and k + step) again, in one probe, with `confirm_seeds` fresh seeds (default: `seeds`): the
    boundary is confirmed when k still trains and k + step still does not.
    """
    if upper < step:
        raise ValueError(f"upper must be at least {step}, got {upper}")
    trials: list[Trial] = []

    def judged(done: list[Trial], depth: int) -> bool:
        at = [t for t in done if t.depth == depth]
        ok = is_trainable([t.val_err for t in at], max_error)
        for trial in at:
            trial.trainable = ok
        return ok

    def probe(m: int) -> Generator[list[Request], list[Trial], bool]:
        done = yield [(step * m, seed, "search") for seed in range(first_seed, first_seed + seeds)]
        trials.extend(done)
        return judged(done, step * m)

    top = upper // step
    lo, hi = 0, top + 1  # invariant: lo trainable (0 by convention), hi not (upper+1 by convention)
    if guess is not None:  # gallop away from the guess until the verdict flips: that is the bracket
        start = min(max(guess // step, 1), top)
        trains = yield from probe(start)
        lo, hi = (start, hi) if trains else (lo, start)
        jump = 1
        while hi - lo > 1:
            m = lo + jump if trains else hi - jump
            if not 1 <= m <= top:
                break
            if (yield from probe(m)) == trains:
                lo, hi = (m, hi) if trains else (lo, m)
                jump *= 2
            else:
                lo, hi = (lo, m) if trains else (m, hi)
                break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if (yield from probe(mid)) else (lo, mid)
    confirm_seed = first_seed + seeds  # seeds the search did not use
    fresh = range(confirm_seed, confirm_seed + (seeds if confirm_seeds is None else confirm_seeds))
    around = [m for m in (lo, lo + 1) if 1 <= m <= upper // step]
    done = yield [(step * m, seed, "confirm") for m in around for seed in fresh]
    trials += done
    confirmed = all(judged(done, step * m) == (m == lo) for m in around)
    return SearchResult(variant, upper, step * lo, confirmed, trials, guess)


def trials_needed(
    upper: int, deepest: int, seeds: int = 1, step: int = 3, guess: int | None = None, confirm_seeds: int | None = None
) -> int:
    """The trials a search would train if exactly the depths up to `deepest` trained (trainability monotone in
    depth, confirmation agreeing): to compare a search with and without a guess on the same boundary."""
    plan = search_plan(upper, seeds, step=step, guess=guess, confirm_seeds=confirm_seeds)
    count, requests = 0, next(plan)
    while True:
        count += len(requests)
        done = [Trial("net", d, s, 0.0, 0.0 if d <= deepest else 1.0, None, phase) for d, s, phase in requests]
        try:
            requests = plan.send(done)
        except StopIteration:
            return count


def run_searches(
    plans: dict[str, Generator[list[Request], list[Trial], SearchResult]],
    train: Callable[[str, int, int], tuple[float, float]],
    launcher: LocalLauncher | RayLauncher | None = None,
    log: TrialLog | None = None,
    on_done: Callable[[SearchResult], None] | None = None,
    group: GroupFn | None = None,
) -> list[SearchResult]:
    """Run the variants' searches side by side, `train(variant, depth, seed)` training each trial: every trial a
    probe needs goes to the launcher as soon as the probe is known, and a variant moves on as soon as its own probe
    has trained. With `group`, the seeds a probe needs at one depth go as one call, `group(variant, depth, seeds)`,
    which trains them together and returns their outcomes in order (each trial then records its share of the call's
    wall time). Each trial goes into `log` as it finishes; one already there (not failed) is not trained again. With
    one slot (the local launcher) the variants run one after another, in order, as a plain loop would run them."""
    launcher = launcher if launcher is not None else LocalLauncher()
    log = log if log is not None else TrialLog()
    order = {variant: i for i, variant in enumerate(plans)}
    results: dict[str, SearchResult] = {}
    probes: dict[str, tuple[list[Request], list[Trial | None]]] = {}
    queue: list[tuple[str, tuple[int, ...]]] = []  # (variant, indices in its probe) of the calls not yet submitted
    running: dict[int, tuple[str, tuple[int, ...], float]] = {}  # handle: (variant, indices, submitted at)

    def advance(variant: str, done: list[Trial] | None) -> None:
        while True:  # a probe whose trials are all in the log is answered at once
            try:
                requests = plans[variant].send(done)
            except StopIteration as stop:
                results[variant] = stop.value
                log.save()  # the trials' trainable verdicts
                if on_done is not None:
                    on_done(stop.value)
                return
            log.save()
            found = [log.get(variant, depth, seed) for depth, seed, _ in requests]
            for trial, (_, _, phase) in zip(found, requests, strict=True):
                if trial is not None:  # in this probe's phase (an earlier search may have confirmed with this seed)
                    trial.phase = phase
            if any(t is None for t in found):
                probes[variant] = requests, found
                missing = [i for i, t in enumerate(found) if t is None]
                if group is None:
                    queue.extend((variant, (i,)) for i in missing)
                else:  # one call per depth
                    for depth in dict.fromkeys(requests[i][0] for i in missing):
                        queue.append((variant, tuple(i for i in missing if requests[i][0] == depth)))
                return
            done = found

    for variant in plans:
        advance(variant, None)
    while queue or running:
        while queue and len(running) < launcher.slots:
            variant, indices = min(queue, key=lambda item: order[item[0]])  # the first variant's trials first
            queue.remove((variant, indices))
            requests = probes[variant][0]
            depth, seeds = requests[indices[0]][0], [requests[i][1] for i in indices]
            if len(indices) == 1:
                handle = launcher.submit(f"{variant} k={depth} seed={seeds[0]}", train, variant, depth, seeds[0])
            else:
                label = f"{variant} k={depth} seeds={','.join(map(str, seeds))} (grouped)"
                handle = launcher.submit(label, group, variant, depth, seeds)
            running[handle] = variant, indices, time.perf_counter()
        handle, outcome = launcher.wait()
        variant, indices, submitted = running.pop(handle)
        seconds = (time.perf_counter() - submitted) / len(indices)  # a grouped call's members share its time
        requests, found = probes[variant]
        if len(indices) == 1:
            outcomes = [outcome]
        else:  # a grouped call that failed fails each of its trials
            outcomes = [outcome] * len(indices) if isinstance(outcome, Failed) else outcome
        for i, each in zip(indices, outcomes, strict=True):
            depth, seed, phase = requests[i]
            if isinstance(each, Failed):
                trial = Trial(variant, depth, seed, math.nan, math.nan, None, phase, each.error, seconds)
            else:
                trial = Trial(variant, depth, seed, *each, None, phase, seconds=seconds)
            print(f"  {variant} k={depth:4d} seed={seed}: {trial_outcome(trial)}", flush=True)
            found[i] = log.add(trial)
        if all(t is not None for t in found):
            del probes[variant]
            advance(variant, found)
    return [results[variant] for variant in plans]


def search_depth(
    train: TrainFn,
    upper: int,
    seeds: int = 1,
    max_error: float = 0.2,
    first_seed: int = 0,
    variant: str = "net",
    step: int = 3,
    log: TrialLog | None = None,
    confirm_seeds: int | None = None,
) -> SearchResult:
    """One variant's search (`search_plan`), its trials trained here one after another by `train`."""
    plan = search_plan(upper, seeds, max_error, first_seed, variant, step, confirm_seeds=confirm_seeds)
    return run_searches({variant: plan}, lambda _, depth, seed: train(depth, seed), log=log)[0]


def trial_outcome(trial: Trial) -> str:
    """`train err 0.0312, val err 0.0288`, `diverged` or `failed: <error>`."""
    if trial.error:
        return f"failed: {trial.error}"
    if math.isnan(trial.val_err):
        return "diverged"
    return f"train err {trial.train_err:.4f}, val err {trial.val_err:.4f}"


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
                    float(row["val_err"]), trainable, row["phase"], row.get("error") or "",
                    float(row.get("seconds") or "nan"),
                )  # fmt: skip
                self.trials[(trial.variant, trial.depth, trial.seed)] = trial

    def get(self, variant: str, depth: int, seed: int) -> Trial | None:
        """The trial already trained at (variant, depth, seed); None when it is not, or when it failed."""
        trial = self.trials.get((variant, depth, seed))
        return None if trial is None or trial.error else trial

    def take(self, earlier: TrialLog, rename: dict[str, str] | None = None) -> int:
        """Add the trials of an `earlier` search that this log lacks (not its failed ones), their variants renamed
        by `rename` where it names them; returns how many."""
        renamed = [replace(t, variant=(rename or {}).get(t.variant, t.variant), trainable=None)
                   for t in earlier.trials.values() if not t.error]  # fmt: skip
        new = [t for t in renamed if self.get(t.variant, t.depth, t.seed) is None]
        for trial in new:
            self.trials[(trial.variant, trial.depth, trial.seed)] = trial
        self.save()
        return len(new)

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


def confirmation(result: SearchResult) -> str:
    """What the confirmation found, for a table: `yes`/`no` about the boundary, or, when no depth trained, whether
    the shallowest depth failed again with fresh seeds (a `yes` there would read as a confirmed trainable depth)."""
    if result.deepest:
        return "yes" if result.confirmed else "no"
    shallowest = min(t.depth for t in result.trials)
    return f"k = {shallowest} fails again" if result.confirmed else f"no: k = {shallowest} trains with other seeds"


def describe(result: SearchResult, max_error: float) -> str:
    """The search's outcome in a line: the deepest trainable depth and whether it was confirmed, or that none trained."""
    if result.deepest == 0:
        searched = [t for t in result.trials if t.phase == "search"]
        first = sorted((t for t in searched if t.depth == min(t.depth for t in searched)), key=lambda t: t.seed)
        errs = [t.val_err for t in first]
        if any(t.error for t in first):
            how = "failed"
        elif any(math.isnan(e) for e in errs):
            how = "diverged"
        else:
            how = f"has val err {sum(errs) / len(errs):.2f}"
        line = f"no depth trainable: k = {first[0].depth} {how} (trainable: below {max_error:.2f})"
        if not result.confirmed:
            line += f"; NOT confirmed: k = {first[0].depth} trains with other seeds, try more --seeds"
    else:
        verdict = "confirmed" if result.confirmed else "NOT confirmed: the boundary is noisy, try more --seeds"
        line = f"deepest trainable k = {result.deepest} ({verdict})"
    failed = sum(bool(t.error) for t in result.trials)
    if failed:  # a failed trial counts as untrainable: the boundary may be too low
        line += f"; {failed} trial(s) FAILED and counted as untrainable (see results.md; the same command retries them)"
    return line
