"""Regenerate docs/results/dead-units.md: Adam against SGD on the 10k split, and Adam with and without ReDo.

python docs/results/make/dead_units.py [--seeds 0 1 2] [--short_seeds 0 1 2] [--only BLOCK] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml
from regenerate import Page, RegenerationError, last, percent, read_csv, regenerate, table

from lightning_modules.run.checkpoints import read_checkpoint

ADAM, SGD = "dead_units/mnist_vgg_adam.yaml", "dead_units/mnist_vgg_sgd.yaml"
HE = ["--model.init_args.net.init_args.init", "fan_in"]
REDO = "presets/redo.yaml"
TINY_VGG = [["conv1_1", [4, None]], ["pool1", [2, 2]], ["conv2_1", [8, None]], ["pool2", [2, 2]], ["fc5", [16, None]],
            ["logit", [None, None]]]  # fmt: skip


def smaller(page: Page) -> list[str]:
    """In a smoke run, a VGG of three small layers instead of mnist_vgg.yaml's seven (a config stacked after it)."""
    if not page.smoke:
        return []
    path = page.runs / "tiny_vgg.yaml"
    path.write_text(yaml.safe_dump({"model": {"init_args": {"net": {"init_args": {"model_conf": TINY_VGG}}}}}))
    return ["--config", str(path)]


def fit_and_test(page: Page, key: str, config: str, *extra: str) -> tuple[Path, Path]:
    """`fit` of a config on the 10k split, then `test` of its last checkpoint: (fit folder, test folder)."""
    args = ["--config", page.config(config), *smaller(page), *extra, *page.data]
    fitted = page.train("fit", key, *args)
    tested = page.train("test", f"{key}_test", *args, "--ckpt_path", fitted / "checkpoints" / "last.ckpt")
    return fitted, tested


def units(folder: Path) -> dict[str, int]:
    """Units per observed layer, from the last DeadUnits record (each unit's peak activation)."""
    records = sorted((folder / "dead_units").glob("step*.pt"))
    return {layer: len(peaks) for layer, peaks in torch.load(records[-1], weights_only=True).items()}


def dead_cells(folder: Path, tested: Path, dormant: bool = False) -> tuple[list[str], list]:
    """Dead units per layer and in total at the last check, (the dormant ones), validation and test accuracy."""
    rows, layers = read_csv(folder / "metrics.csv"), units(folder)
    cells = [f"{last(rows, f'dead/{layer}'):.0f}" for layer in layers]
    cells.append(f"{last(rows, 'dead/total'):.0f}")
    if dormant:
        share = last(rows, "dormant/tau0.025/total")
        cells.append(f"{share * sum(layers.values()):.0f} ({percent(share)})")
    test = last(read_csv(tested / "metrics.csv"), "test/acc")
    return list(layers), [*cells, percent(last(rows, "val/acc")), percent(test)]


def epochs(folder: Path) -> str:
    n = int(last(read_csv(folder / "metrics.csv"), "epoch")) + 1
    return f"{n} epoch{'s' if n > 1 else ''}"


def adam_vs_sgd(page: Page) -> str:
    runs = [
        ("Adam lr 1e-3 (the config: PyTorch default init)", "adam_s0", ADAM, ["--seed_everything", "0"]),
        ("SGD lr 0.01, momentum 0.9 (the config)", "sgd", SGD, []),
        ("Adam, He init (`--model.init_args.net.init_args.init fan_in`)", "adam_he", ADAM, HE),
        ("SGD, He init", "sgd_he", SGD, HE),
    ]
    rows = []
    for i, (label, key, config, extra) in enumerate(runs):
        folder, tested = fit_and_test(page, key, config, *extra)
        layers, cells = dead_cells(folder, tested)
        if i < 2:  # the two configs as they are
            cells[len(layers)] = f"**{cells[len(layers)]}**"
        rows.append([label, *cells])
    sizes = units(page.folder("adam_s0"))
    header = [f"dead units after {epochs(page.folder('adam_s0'))}", *layers, "total", "val acc", "test acc"]
    units_row = ["units", *(f"{n:,}" for n in sizes.values()), f"{sum(sizes.values()):,}", "", ""]
    return table(header, [units_row, *rows])


def recycled_at_last_event(folder: Path) -> dict[str, torch.Tensor]:
    """Per layer, the units recycled at the last event if the last check counts them fresh (`recycle/<layer>/fresh`:
    fewer than F steps before it), from the events kept in last.ckpt; nothing for a run without recycling."""
    rows = read_csv(folder / "metrics.csv")
    if "recycle/total/fresh" not in rows[0] or not last(rows, "recycle/total/fresh"):
        return {}
    events = read_checkpoint(folder / "checkpoints" / "last.ckpt")["recycling"]["events"]
    units = events[-1]["units"]
    for layer, ids in units.items():
        if len(ids) != last(rows, f"recycle/{layer}/fresh"):
            raise RegenerationError(f"{folder}: the last event's {layer} units are not those its last check logged")
    return units


def fresh_apart(folder: Path) -> tuple[int, int, int]:
    """The last event's fresh units at the last check: how many, how many of them are alive (counted dead when
    apart), and how many are not dormant (counted dormant when apart)."""
    units = recycled_at_last_event(folder)
    peaks = torch.load(sorted((folder / "dead_units").glob("step*.pt"))[-1], weights_only=True)
    health = torch.load(folder / "unit_health.pt", weights_only=True)
    alive = sum(int((peaks[layer][ids] > 0).sum()) for layer, ids in units.items())  # a ReLU unit: alive above 0
    awake = sum(int((~health[layer]["dormant"][-1][ids]).sum()) for layer, ids in units.items())
    return sum(len(ids) for ids in units.values()), alive, awake


def redo(page: Page) -> str:
    """Seeds of Adam with and without ReDo (configs/presets/redo.yaml): the counts at the last check as the callback
    makes them and with the units of the last event apart; the first seed's dormant-share plots."""
    every = page.pick([], ["--model.init_args.recycle.every_n_steps", "1"])  # smoke: events within its two steps
    rows = []
    for seed in page.options.seeds:
        seeded = ["--seed_everything", str(seed)]
        recycling = [*seeded, "--config", page.config(REDO), *every]
        for label, key, extra in (("Adam", f"adam_s{seed}", seeded), ("Adam + ReDo", f"redo_s{seed}", recycling)):
            folder, tested = fit_and_test(page, key, ADAM, *extra)
            layers, cells = dead_cells(folder, tested, dormant=True)
            fresh, alive, awake = fresh_apart(folder)
            dead, dormant = int(cells[len(layers)]), int(cells[len(layers) + 1].split()[0])
            recycled = f"{fresh}, {alive}" if key.startswith("redo") else ""
            apart = [f"**{dead + alive}**", cells[len(layers) + 1], str(dormant + awake)]
            rows.append([f"{label}, seed {seed}", *cells[: len(layers) + 1], recycled, *apart, *cells[-2:]])
    first = page.options.seeds[0]
    page.figure(page.folder(f"adam_s{first}") / "dormant_share.png", "dormant_share_mnist_vgg_adam.png")
    page.figure(page.folder(f"redo_s{first}") / "dormant_share.png", "dormant_share_mnist_vgg_adam_redo.png")
    header = ["run", *layers, "dead", "fresh, alive", "dead, fresh apart", "dormant (tau 0.025)",
              "dormant, fresh apart", "val acc", "test acc"]  # fmt: skip
    return table(header, rows)


def redo_short(page: Page) -> str:
    """Shorter runs: 3 epochs, an event every 50 steps, dead units at the end without and with ReDo, the last
    event's units counted as the callback counts them and apart."""
    short = ["--trainer.max_epochs", "3"]
    every = ["--model.init_args.recycle.every_n_steps", str(page.pick(50, 1))]
    adam = ["--config", page.config(ADAM), *smaller(page)]
    rows = []
    for seed in page.options.short_seeds:
        seeded = [*short, "--seed_everything", str(seed)]
        plain = page.train("fit", f"short_adam_s{seed}", *adam, *seeded, *page.data)
        recycled = page.train(
            "fit", f"short_redo_s{seed}", *adam, "--config", page.config(REDO), *seeded, *every, *page.data
        )
        without, dead = (int(last(read_csv(f / "metrics.csv"), "dead/total")) for f in (plain, recycled))
        fresh, alive, _ = fresh_apart(recycled)
        again = percent((fresh - alive) / fresh, 0) if fresh else "n/a"
        rows.append([str(seed), str(without), str(dead), f"{dead - without:+d}", str(dead + alive),
                     f"{dead + alive - without:+d}", f"{fresh}: {again}"])  # fmt: skip
    header = ["seed", "dead, Adam", "dead, Adam + ReDo", "difference", "dead, last event's units apart", "difference",
              "last event's units: dead at the end"]  # fmt: skip
    return table(header, rows)


def seeds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the ReDo comparison")
    parser.add_argument("--short_seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the 3-epoch runs")


BLOCKS = {"dead-units/adam-vs-sgd": adam_vs_sgd, "dead-units/redo": redo, "dead-units/redo-short": redo_short}


def main(argv: list[str] | None = None) -> None:
    regenerate("dead-units", BLOCKS, argv, seeds)


if __name__ == "__main__":
    main(sys.argv[1:])
