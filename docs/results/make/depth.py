"""Regenerate docs/results/depth.md: the binary depth searches, the depths predicted at initialisation, and the
search started from the prediction, on the 10k split with the original's 705 steps per trial.

    python docs/results/make/depth.py [--seeds 3] [--searched VARIANT ...] [--only BLOCK] [--smoke]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from regenerate import DATA, Page, markdown_rows, read_csv, regenerate, table

LABELS = {  # each variant config as the tables name it
    "tanh": "tanh, N(0, 0.05)",
    "tanh_init": "tanh, sqrt(1/(9 C_in))",
    "elu": "ELU",
    "elu_bn": "ELU + BN",
    "resnet": "ResNet (ELU + BN)",
    "tanh_bn": "tanh + BN",
    "resnet_nobn": "ResNet without BN",
    "tanh_delta_orthogonal": "tanh, delta-orthogonal (critical, sigma_b 0.05)",
}
BINARY = {"tanh": 24, "resnet_nobn": 24}  # variant: the original's search bound
PREDICTED = {"tanh_init": 120, "tanh_delta_orthogonal": 120}
# the rows searched on their own, one seed per depth and the search's confirmation: variant: (the original's bound,
# bracket); from the prediction where the nets are within the mean field (no BN, no residual), as tanh with the
# better init, where the prediction's start saved trials; binary where the probe's prediction lies far below the
# original's depth (BN and residual nets: 29-56 against 96-447), which galloping up from it would cost trials
ROWS = {"elu": (150, "predicted"), "tanh_bn": (120, "binary"), "elu_bn": (300, "binary"), "resnet": (450, "binary")}
TABLE = ["tanh", "tanh_init", "elu", "elu_bn", "resnet", "tanh_bn", "resnet_nobn"]  # the spec's seven rows
CONFIRM_SEEDS = 3  # fresh seeds at each of the two confirmation depths of the ROWS' searches
MAX_ERROR = 0.2  # the search's --max_error: a depth trains when its seeds' mean validation error is below it


def original_depth(variant: str) -> str:
    from lightning_modules.studies.search import ORIGINAL_DEPTHS

    return str(ORIGINAL_DEPTHS.get(variant, "-"))


def search(
    page: Page, key: str, variant: str, *args: str, progress: Callable[[Path], None] | None = None
) -> tuple[list[dict], list[dict]]:
    """A search of a variant's config on the 10k split, 705 SGD steps per trial: its summary (results.md) and its
    trials (results.csv)."""
    configs = (f"depth/{variant}.yaml", "presets/mnist_10k.yaml", "presets/original_steps.yaml")
    arguments = (*(arg for c in configs for arg in ("--config", page.config(c))), *page.data, *args)
    folder = page.train("search", key, *arguments, progress=progress)
    return markdown_rows(folder / "results.md", "variant"), read_csv(folder / "results.csv")


def name(variant: str) -> str:
    return variant.rsplit("/", 1)[-1]


def error(trial: dict) -> float:
    return float(trial["val_err"])


def spread_of(errors: list[float]) -> str:
    """The validation errors of one depth's seeds: their range, how many diverged, and their mean where some
    seeds train and others do not (the search decides on the mean)."""
    finite = sorted(e for e in errors if not math.isnan(e))
    diverged = len(errors) - len(finite)
    if not finite:
        return f"diverged in {diverged} of {len(errors)}"
    low, high = f"{finite[0]:.3f}", f"{finite[-1]:.3f}"
    values = low if low == high else f"{low}-{high}"
    mean = f", mean {statistics.mean(finite):.2f}" if finite[0] < MAX_ERROR <= finite[-1] else ""
    if diverged:
        return f"{values} in {len(finite)} of {len(errors)} seeds{mean}, {diverged} diverged"
    return f"{values} ({len(errors)} seed{'s' if len(errors) > 1 else ''}{mean})"


def what_trials_show(trials: list[dict]) -> str:
    """Per depth, the validation errors of the search's seeds and of the confirmation's."""
    parts = []
    for depth in sorted({int(t["depth"]) for t in trials}):
        phases = []
        for phase, where in (("search", ""), ("confirm", " in the confirmation")):
            errors = [error(t) for t in trials if int(t["depth"]) == depth and t["phase"] == phase]
            if errors:
                phases.append(spread_of(errors) + where)
        parts.append(f"k = {depth}: " + ", ".join(phases))
    return "; ".join(parts)


def verdict(summary: dict) -> str:
    """A search's `confirmed` column in words."""
    return {"yes": "confirmed", "no": "not confirmed"}.get(summary["confirmed"], summary["confirmed"])


def deepest(summary: dict) -> str:
    return f"**{summary['max trainable k']}** ({verdict(summary)})"


def binary_search(page: Page) -> str:
    rows = []
    for variant, bound in BINARY.items():
        upper, seeds = str(page.pick(bound, 3)), str(page.options.seeds)
        summary, trials = search(page, f"binary/{variant}", variant, "--upper", upper, "--seeds", seeds)
        rows.append(
            [f"`{variant}.yaml`", upper, deepest(summary[0]), what_trials_show(trials), original_depth(variant)]
        )
    header = ["variant", "search bound", "deepest trainable k found", "what the trials show (val err)", "original's k"]
    return table(header, rows, "lrrlr")


def depth_value(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1f}" if value < 9.95 else f"{value:.0f}"


def prediction(page: Page) -> str:
    """`propagate` of every variant of search_all.yaml; the prediction at the deepest and a shallower probe depth."""
    depths = page.pick([24, 96], [6, 9])
    header = [
        "variant", f"predicted k, probe k = {depths[1]} (range over {page.pick(3, 1)} seeds)", f"from k = {depths[0]}",
        f"binding scale at k = {depths[1]}", "mean-field prediction", "original's k (full MNIST)",
    ]  # fmt: skip
    return table(header, prediction_rows(page))


def prediction_rows(page: Page) -> list[list[str]]:
    """The prediction table's rows (`propagate` runs once per scratch folder)."""
    depths = page.pick([24, 96], [6, 9])
    config = ["--config", page.config("depth/tanh.yaml"), "--config", page.config("presets/mnist_10k.yaml")]
    folder = page.train(
        "propagate", "propagate", *config, *page.data, "--config", page.config("depth/search_all.yaml"),
        *page.pick([], ["--depths", str(depths)]),
    )  # fmt: skip
    scales = read_csv(folder / "depth_scales.csv")
    theory = {
        name(r["variant"]): r["mean-field predicted k"] for r in markdown_rows(folder / "propagation.md", "variant")
    }
    rows = []
    for variant in dict.fromkeys(name(r["variant"]) for r in scales):
        at = {d: [r for r in scales if name(r["variant"]) == variant and int(r["depth"]) == d] for d in depths}
        deep = [float(r["predicted"]) for r in at[depths[1]]]
        binds = sum(float(r["xi_c"]) < float(r["xi_grad"]) for r in at[depths[1]])
        rows.append([
            LABELS.get(variant, variant),
            f"{depth_value(statistics.median(deep))} ({depth_value(min(deep))}-{depth_value(max(deep))})",
            depth_value(statistics.median(float(r["predicted"]) for r in at[depths[0]])),
            f"xi_c in {binds} of {len(deep)}",
            "outside the theory" if theory[variant] == "n/a" else theory[variant],
            original_depth(variant),
        ])  # fmt: skip
    return rows


def predicted_search(page: Page) -> tuple[list[dict], list[dict]]:
    """The bound-120 variants of `--searched`, each searched with `--bracket predicted` in a command of its own (a
    variant's trials do not depend on the others'), one seed per depth: their summaries and trials."""
    summaries, trials = [], []
    for variant in page.options.searched:
        bound = page.pick(PREDICTED[variant], 6)
        variants = f"{{{page.config(f'depth/{variant}.yaml')}: {bound}}}"
        probe = page.pick([], ["--probe_depth", "6"])
        summary, own = search(page, f"predicted/{variant}", "tanh", "--variants", variants, "--bracket", "predicted",
                              *probe)  # fmt: skip
        summaries += summary
        trials += own
    return summaries, trials


def predicted_table(page: Page) -> str:
    summaries, trials = predicted_search(page)
    rows = []
    for summary in summaries:
        variant = name(summary["variant"])
        own = [t for t in trials if name(t["variant"]) == variant]
        rows.append([
            LABELS.get(variant, variant), summary["predicted k"].replace("..", "-"), own[0]["depth"] if own else "",
            deepest(summary), original_depth(variant), summary["trials"], summary["binary search"],
            summary["from prediction"],
        ])  # fmt: skip
    for variant in PREDICTED:
        if variant not in page.options.searched:
            rows.append([LABELS[variant], "", "", "not run", original_depth(variant), "", "", ""])
    header = ["variant", "predicted k (seeds)", "first probe", "deepest trainable k", "original's k", "trials",
              "binary", "from the prediction"]  # fmt: skip
    return table(header, rows)


def predicted_trials(page: Page) -> str:
    """The trials of the search from the prediction, in the order it trained them."""
    _, trials = predicted_search(page)
    lines = []
    for variant in dict.fromkeys(name(t["variant"]) for t in trials):
        own = [t for t in trials if name(t["variant"]) == variant]
        parts = []
        for phase, lead in (("search", "k = "), ("confirm", "confirmation with seed {seed}: ")):
            done = [t for t in own if t["phase"] == phase]
            if done:
                values = ", ".join(
                    f"{t['depth']}: {'diverged' if math.isnan(error(t)) else f'{error(t):.3f}'}" for t in done
                )
                parts.append(lead.format(seed=done[0]["seed"]) + values)
        lines.append(f"- {LABELS.get(variant, variant)}: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def minutes(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def row_args(page: Page, variant: str) -> list[str]:
    """The search arguments of one of the ROWS: one seed per depth, from its bracket."""
    bound, bracket = ROWS[variant]
    args = ["--upper", str(page.pick(bound, 6)), "--seeds", "1", "--bracket", bracket]
    return args + (page.pick([], ["--probe_depth", "6"]) if bracket == "predicted" else [])


def row_search(page: Page, variant: str) -> tuple[dict, list[dict], str]:
    """One of the ROWS searched on its own: its summary, its trials and the command's key; its results.md,
    results.csv and config.yaml are kept beside the page (docs/results/searches/depth_VARIANT.*), its plot in the
    figures. Its trials are kept as they train (results.csv and config.yaml, no results.md until it has finished):
    a search kept unfinished, in this checkout or another, is continued from them (`--trials_from`)."""
    key = f"rows/{variant}"
    args = row_args(page, variant)
    if unfinished(page, variant):
        args += ["--trials_from", kept_search(page, variant)]
    summary, trials = search(page, key, variant, *args, progress=partial(keep_progress, page, variant))
    for source, suffix in (("results.md", "md"), ("results.csv", "csv"), ("config.yaml", "yaml")):
        page.keep(page.folder(key) / source, f"depth_{variant}.{suffix}")
    page.figure(page.folder(key) / "error_vs_depth.png", f"depth_search_{variant}.png")
    return summary[0], trials, key


def unfinished(page: Page, variant: str) -> bool:
    """Whether a row's search is kept with some of its trials and no summary yet (stopped before it finished)."""
    return (page.kept / f"depth_{variant}.csv").is_file() and not (page.kept / f"depth_{variant}.md").is_file()


def keep_progress(page: Page, variant: str, folder: Path) -> None:
    """Keep a running row search's trials so far beside the page, whenever it has trained another."""
    source, kept = folder / "results.csv", page.kept / f"depth_{variant}.csv"
    if not source.is_file() or (kept.is_file() and len(read_csv(source)) <= len(read_csv(kept))):
        return
    (page.kept / f"depth_{variant}.md").unlink(missing_ok=True)  # a summary kept before is not this search's
    page.keep(folder / "config.yaml", f"depth_{variant}.yaml")
    page.keep(source, f"depth_{variant}.csv")


def search_time(page: Page, key: str, trials: list[dict]) -> float | None:
    """A search's time: its trials' own recorded seconds, summed over the commands that trained them (a search
    continued from kept trials), or the command's time where its trials do not record theirs."""
    recorded = [float(t.get("seconds") or "nan") for t in trials]
    return sum(recorded) if recorded and not any(math.isnan(s) for s in recorded) else page.seconds(key)


def kept_search(page: Page, variant: str) -> str:
    """A run folder made of a row's kept search (results.csv and config.yaml, the data where this page reads it),
    for `--trials_from`: its kept confirmation where there is one (its trials are the search's and the new seeds'),
    so that a confirmation already kept trains nothing again."""
    stem = f"depth_{variant}_confirm" if (page.kept / f"depth_{variant}_confirm.yaml").is_file() else f"depth_{variant}"
    folder = page.runs / "kept_searches" / variant
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.csv").write_text((page.kept / f"{stem}.csv").read_text())
    config = (page.kept / f"{stem}.yaml").read_text()
    (folder / "config.yaml").write_text(config.replace(str(DATA), str(page.options.data.resolve())))
    return str(folder)


def confirmations(page: Page) -> str:
    """Each of the ROWS' kept searches confirmed again with CONFIRM_SEEDS fresh seeds at both depths around its
    boundary: the same search with `--confirm_seeds`, every other trial taken from the kept one (`--trials_from`).
    Its time is that of the trials the kept search lacks, as they recorded it (a rerun that takes them all trains
    nothing, and says the same)."""
    seeds = page.pick(CONFIRM_SEEDS, 2)
    rows, confirmed = [], []
    for variant in (v for v in ROWS if v in page.options.rows):
        if not (page.kept / f"depth_{variant}.md").is_file():
            continue  # not searched yet, or not to the end (seven-rows keeps what it searched)
        key = f"confirm/{variant}"
        args = [*row_args(page, variant), "--confirm_seeds", str(seeds), "--trials_from", kept_search(page, variant)]
        summary, trials = search(page, key, variant, *args)
        for source, suffix in (("results.md", "md"), ("results.csv", "csv"), ("config.yaml", "yaml")):
            page.keep(page.folder(key) / source, f"depth_{variant}_confirm.{suffix}")
        confirmed.append(variant)
        found = summary[0]["max trainable k"]
        confirm = [t for t in trials if t["phase"] == "confirm"]
        base = int(found) if found.isdigit() else 0  # none trains: the confirmation is at k = 3
        at = [[error(t) for t in confirm if t["depth"] == str(d)] for d in (base, base + 3)]
        searched = {(t["depth"], t["seed"]) for t in read_csv(page.kept / f"depth_{variant}.csv")}
        new = sum(float(t["seconds"]) for t in trials if (t["depth"], t["seed"]) not in searched)
        rows.append([LABELS[variant], found, *(spread_of(e) if e else "-" for e in at), verdict(summary[0]),
                     minutes(new)])  # fmt: skip
    header = ["variant", "deepest trainable k found", "val err at k", "val err at k + 3", f"with {seeds} fresh seeds",
              "its new trials' time"]  # fmt: skip
    if not rows:
        return "No row searched yet: run the `depth/seven-rows` block first."
    links = "The confirmations' trials: " + ", ".join(f"[{v}](searches/depth_{v}_confirm.md)" for v in confirmed)
    return "\n\n".join([table(header, rows), links])


def seven_rows(page: Page) -> str:
    """The spec's table: each variant's deepest trainable k found here, beside its prediction and the original's,
    with the search that found it (its bracket, seeds, trials and wall time); `--rows` picks which ROWS run."""
    predicted = {}
    for line in prediction_rows(page):
        predicted[line[0]] = line[1]
    rows = []
    for variant in TABLE:
        if variant in BINARY:
            summary, trials = search(page, f"binary/{variant}", variant, "--upper", str(page.pick(BINARY[variant], 3)),
                                     "--seeds", str(page.options.seeds))  # fmt: skip
            key = f"binary/{variant}"
            found = [deepest(summary[0]), "binary", page.options.seeds, len(trials), minutes(page.seconds(key))]
        elif variant in PREDICTED and variant in page.options.searched:
            summaries, trials = predicted_search(page)
            summary = next(s for s in summaries if name(s["variant"]) == variant)
            own = [t for t in trials if name(t["variant"]) == variant]
            key = f"predicted/{variant}"
            found = [deepest(summary), "from the prediction", 1, len(own), minutes(page.seconds(key))]
        elif variant in ROWS and variant in page.options.rows:
            summary, trials, key = row_search(page, variant)
            bracket = {"binary": "binary", "predicted": "from the prediction"}[ROWS[variant][1]]
            found = [deepest(summary), bracket, 1, len(trials), minutes(search_time(page, key, trials))]
        else:
            found = ["not run", "", "", "", ""]
        bounds = {**PREDICTED, **{v: upper for v, (upper, _) in ROWS.items()}}
        bound = page.pick(BINARY[variant], 3) if variant in BINARY else page.pick(bounds[variant], 6)
        rows.append([LABELS[variant], bound, found[0], predicted.get(LABELS[variant], ""),
                     original_depth(variant), *found[1:]])  # fmt: skip
    header = ["variant", "search bound", "deepest trainable k found", f"predicted k (probe k = {page.pick(96, 9)})",
              "original's k", "search", "seeds per depth", "trials", "wall time"]  # fmt: skip
    plots = [f"![{LABELS[v]}](../figures/depth_search_{v}.png)" for v in ROWS if v in page.options.rows]
    trials = "The searches' trials: " + ", ".join(
        f"[{v}](searches/depth_{v}.md)" for v in ROWS if v in page.options.rows
    )
    return "\n\n".join([table(header, rows), *([trials, " ".join(plots)] if plots else [])])


def seeds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=3, help="seeds per depth of the binary searches")
    parser.add_argument(
        "--searched",
        nargs="+",
        choices=list(PREDICTED),
        default=list(PREDICTED),
        help="the bound-120 variants to search from the prediction (the others: 'not run')",
    )
    parser.add_argument(
        "--rows",
        nargs="*",
        choices=list(ROWS),
        default=["elu", "tanh_bn", "elu_bn"],
        help="the other rows of the spec's table to search, one seed per depth (the others: 'not run')",
    )


BLOCKS = {
    "depth/binary-search": binary_search,
    "depth/seven-rows": seven_rows,
    "depth/confirmations": confirmations,
    "depth/prediction": prediction,
    "depth/predicted-search": predicted_table,
    "depth/predicted-trials": predicted_trials,
}


def main(argv: list[str] | None = None) -> None:
    regenerate("depth", BLOCKS, argv, seeds)


if __name__ == "__main__":
    main(sys.argv[1:])
