"""Regenerate docs/results/compression.md: a WRN-16-2 teacher and Shuffle_4 and Generic_0.5 students with and
without attention transfer, on the 10k split as configs/presets/mnist_10k.yaml splits it today, each tested on the
held-out images.

    python docs/results/make/compression.py [--only BLOCK] [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from regenerate import Page, last, percent, read_csv, regenerate, table

TAPS = ("at_g1", "at_g2", "at_g3")
STUDENTS = {  # key: (label, the student's settings)
    "shuffle4_beta1000": ("student WRN-16-2, `Shuffle_4`, AT (beta 1e3)", []),
    "shuffle4_beta0": ("the same student, no AT (beta 0)", ["--model.init_args.beta", "0"]),
    "generic_beta1000": ("student WRN-16-2, `Generic_0.5`, AT (beta 1e3)", ["--model.init_args.net.init_args.conv", "Generic_0.5"]),
    "generic_beta0": ("the same student, no AT (beta 0)", ["--model.init_args.net.init_args.conv", "Generic_0.5", "--model.init_args.beta", "0"]),
}  # fmt: skip


def fit_and_test(page: Page, key: str, config: str, *extra: str) -> tuple[Path, Path]:
    """`fit` of a config on the 10k split, then `test` of its last checkpoint on the held-out images: the two
    run folders."""
    args = ["--config", page.config(config), "--config", page.config("presets/mnist_10k.yaml"), *page.data, *extra]
    fitted = page.train("fit", key, *args)
    return fitted, page.train("test", f"{key}_test", *args, "--ckpt_path", fitted / "checkpoints" / "last.ckpt")


def smallest(page: Page, *nets: str) -> list[str]:
    """In a smoke run, the WRN-16-2 nets at their smallest, WRN-10-1."""
    size = [("depth", "10"), ("width", "1")]
    return page.pick([], [a for net in nets for k, v in size for a in (f"--model.init_args.{net}.init_args.{k}", v)])


def runs(page: Page) -> dict[str, tuple[Path, Path]]:
    """The teacher, then each student trained from its last checkpoint; each tested: (fit folder, test folder)."""
    folders = {"teacher": fit_and_test(page, "teacher", "compression/mnist_teacher.yaml", *smallest(page, "net"))}
    teacher = folders["teacher"][0] / "checkpoints" / "last.ckpt"
    for key, (_, extra) in STUDENTS.items():
        small = smallest(page, "net", "teacher")
        args = ["--model.init_args.teacher_checkpoint", str(teacher), *extra, *small]
        folders[key] = fit_and_test(page, key, "compression/mnist_student.yaml", *args)
    return folders


def epochs(folder: Path) -> int:
    return int(last(read_csv(folder / "metrics.csv"), "epoch")) + 1


def students(page: Page) -> str:
    folders = runs(page)
    rows = []
    for key, label in [("teacher", "teacher WRN-16-2, `Conv`"), *((k, v[0]) for k, v in STUDENTS.items())]:
        fitted, tested = folders[key]
        counts = yaml.safe_load((fitted / "hparams.yaml").read_text())
        metrics = read_csv(fitted / "metrics.csv")
        at = " / ".join(f"{last(metrics, f'val/{tap}'):.2e}" for tap in TAPS) if key != "teacher" else ""
        rows.append([
            label, f"{counts['complexity/params']:,}", f"{counts['complexity/mult_adds']:.2E}",
            percent(last(metrics, "val/err"), 2), percent(last(read_csv(tested / "metrics.csv"), "test/err"), 2), at,
        ])  # fmt: skip
    n = epochs(folders["teacher"][0])
    header = [
        "net",
        "params",
        "mult-adds",
        f"val error (epoch {n})",
        "test error",
        f"val AT loss g1 / g2 / g3 (epoch {n})",
    ]
    return table(header, rows, "lrrrrl")


def per_epoch(folder: Path, taps: tuple[str, ...]) -> list[float]:
    """The training AT losses summed over `taps`, per epoch (the epoch-level rows of metrics.csv)."""
    rows = [r for r in read_csv(folder / "metrics.csv") if r.get(f"train/{taps[0]}")]
    return [sum(float(r[f"train/{tap}"]) for tap in taps) for r in rows]


def at_curve(page: Page) -> str:
    folders = runs(page)
    rows = []
    for key, who in (("shuffle4_beta1000", "with AT"), ("shuffle4_beta0", "without AT")):
        for taps, what in ((TAPS[2:], "at_g3"), (TAPS, "at_g1 + at_g2 + at_g3")):
            values = per_epoch(folders[key][0], taps)
            rows.append([f"{who}: {what} (1e-4)", *(f"{value / 1e-4:.2f}" for value in values)])
    return table(["epoch", *(str(e) for e in range(1, len(rows[0])))], rows)


BLOCKS = {"compression/students": students, "compression/at-curve": at_curve}


def main(argv: list[str] | None = None) -> None:
    regenerate("compression", BLOCKS, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
