"""Regenerate docs/results/plasticity.md: the interventions of configs/plasticity/interventions.yaml on permuted
MNIST (the 10k split), under SGD and under Adam, `--seeds` each; then permuted labels and random labels, without an
intervention and with L2 Init, under both optimizers.

    python docs/results/make/plasticity.py [--seeds 3] [--only BLOCK] [--smoke]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

from regenerate import Page, read_csv, regenerate, table

OPTIMIZERS = {  # block: the optimizer's arguments over the config's SGD
    "sgd": [],
    "adam": ["--model.init_args.optimizer", "torch.optim.Adam", "--model.init_args.optimizer.lr", "0.001"],
}
LABELS = ("permuted_labels", "random_labels")  # their configs as they are
LABEL_INTERVENTIONS = ["--interventions", "{none: {}, l2_init: {l2_init: 0.001}}"]
SMOKE = ["--data.init_args.tasks", "3", "--data.init_args.steps_per_task", "3", "--trainer.max_steps", "9",
         "--trainer.val_check_interval", "3"]  # fmt: skip


def study(page: Page, optimizer: str, stream: str = "permuted_mnist", *extra: str, figures: bool = True) -> list[dict]:
    """The study's rows (one per intervention, seed and task) of `stream`'s config under `optimizer`: the
    interventions of interventions.yaml, or those `extra` names; its figures copied for this page (`figures`)."""
    data = [arg.replace("--data.", "--data.init_args.data.init_args.", 1) for arg in page.data]  # the stream's data
    configs = ["--config", page.config(f"plasticity/{stream}.yaml"), "--config",
               page.config("plasticity/interventions.yaml")]  # fmt: skip
    folder = page.train(
        "plasticity", f"{stream}_{optimizer}", *configs, *data, *OPTIMIZERS[optimizer], *extra,
        "--seeds", str(page.options.seeds), *page.pick([], SMOKE),
    )  # fmt: skip
    if not figures:
        pass
    elif stream == "permuted_mnist":
        page.figure(folder / "plasticity.png", f"plasticity_{optimizer}.png")
        page.figure(folder / "mechanism.png", f"plasticity_mechanism_{optimizer}.png")
    else:  # the labels' page shows their accuracy curves
        page.figure(folder / "plasticity.png", f"plasticity_{stream}_{optimizer}.png")
    return [{**r, "task": int(r["task"])} for r in read_csv(folder / "results.csv")]


def mean_of(rows: list[dict], column: str) -> float:
    values = [float(r[column]) for r in rows if not math.isnan(float(r[column]))]
    return statistics.mean(values) if values else math.nan


def summary_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Per intervention: online accuracy on the first and last 3 tasks and their change (with its range over seeds),
    final accuracy on the last 3, the dead and dormant shares, the srank and the weight norm after the first and the
    last task."""
    tasks = sorted({r["task"] for r in rows})
    first, last = tasks[:3], tasks[-3:]
    lines = []
    for name in dict.fromkeys(r["intervention"] for r in rows):
        own = [r for r in rows if r["intervention"] == name]
        seeds = sorted({r["seed"] for r in own})
        changes = [mean_of([r for r in own if r["seed"] == s and r["task"] in last], "acc_online")
                   - mean_of([r for r in own if r["seed"] == s and r["task"] in first], "acc_online") for s in seeds]  # fmt: skip
        at = {t: [r for r in own if r["task"] == t] for t in (tasks[0], tasks[-1])}
        lines.append([
            name,
            f"{mean_of([r for r in own if r['task'] in first], 'acc_online'):.3f}",
            f"{mean_of([r for r in own if r['task'] in last], 'acc_online'):.3f}",
            f"{statistics.mean(changes):+.3f} ({min(changes):+.3f} to {max(changes):+.3f})",
            f"{mean_of([r for r in own if r['task'] in last], 'acc_final'):.3f}",
            f"{mean_of(at[tasks[0]], 'dead'):.3f} -> {mean_of(at[tasks[-1]], 'dead'):.3f}",
            f"{mean_of(at[tasks[0]], 'dormant'):.3f} -> {mean_of(at[tasks[-1]], 'dormant'):.3f}",
            f"{mean_of(at[tasks[0]], 'srank'):.0f} -> {mean_of(at[tasks[-1]], 'srank'):.0f}",
            f"{mean_of(at[tasks[0]], 'weight_norm'):.1f} -> {mean_of(at[tasks[-1]], 'weight_norm'):.1f}",
        ])  # fmt: skip
    header = ["intervention", f"online acc, tasks {first[0]}-{first[-1]}", f"tasks {last[0]}-{last[-1]}",
              "change (range over seeds)", "final acc, last 3", "dead share, first -> last task",
              "dormant share", "srank", "weight norm"]  # fmt: skip
    return header, lines


def summary(page: Page, optimizer: str) -> str:
    return table(*summary_rows(study(page, optimizer)))


def sgd(page: Page) -> str:
    return summary(page, "sgd")


def adam(page: Page) -> str:
    return summary(page, "adam")


def labels(page: Page) -> str:
    """Permuted labels and random labels under SGD and Adam, without an intervention and with L2 Init."""
    lines = []
    for stream in LABELS:
        for optimizer in OPTIMIZERS:
            subset = page.pick([], ["--data.init_args.random_label_samples", "16"]) if stream == "random_labels" else []
            header, rows = summary_rows(study(page, optimizer, stream, *LABEL_INTERVENTIONS, *subset))
            lines += [[stream.replace("_", " "), optimizer, *row] for row in rows]
    header[1:3] = ["online acc, first 3 tasks", "last 3 tasks"]  # the streams' lengths differ
    return table(["stream", "optimizer", *header], lines)


def seeds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=3, help="seeds per intervention")


BLOCKS = {"plasticity/sgd": sgd, "plasticity/adam": adam, "plasticity/labels": labels}


def main(argv: list[str] | None = None) -> None:
    regenerate("plasticity", BLOCKS, argv, seeds)


if __name__ == "__main__":
    main(sys.argv[1:])
