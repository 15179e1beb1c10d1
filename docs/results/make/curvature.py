"""Regenerate docs/results/curvature.md: spec 08's measures on this project's own questions, on the 10k split: the
sharpness and weight spectra of the dead-unit study's VGG under Adam and under SGD, how similar the compressed
MNIST students are to their teacher, layer by layer, with and without attention transfer, and the weight spectra
per task of a permuted-labels stream beside its dormant units.

    python docs/results/make/curvature.py [--seeds 3] [--only BLOCK] [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

from compression import smallest
from plasticity import LABEL_INTERVENTIONS, mean_of, seeds, study
from regenerate import Page, read_csv, regenerate, table

OPTIMIZERS = ("adam", "sgd")
EPOCHS = (1, 2, 5, 10)  # the rows of the dead-units block: after these epochs (smoke: after its one)
STUDENTS = {  # key: (label, the student's settings), as docs/results/compression.md trains them
    "shuffle4_beta1000": ("`Shuffle_4`, AT", []),
    "shuffle4_beta0": ("`Shuffle_4`, no AT", ["--model.init_args.beta", "0"]),
    "generic_beta1000": ("`Generic_0.5`, AT", ["--model.init_args.net.init_args.conv", "Generic_0.5"]),
    "generic_beta0": ("`Generic_0.5`, no AT", ["--model.init_args.net.init_args.conv", "Generic_0.5", "--model.init_args.beta", "0"]),
}  # fmt: skip


def rows_with(rows: list[dict], key: str) -> list[dict]:
    return [r for r in rows if r.get(key, "") != ""]


def vgg(page: Page, optimizer: str) -> list[dict]:
    """The dead-unit study's VGG (10 epochs of 63 steps) with Sharpness at every epoch's first step and at the end,
    and WeightSpectra at every epoch's end: its metrics.csv rows."""
    every = page.pick(63, 2)
    folder = page.train(
        "fit", f"vgg_{optimizer}", "--config", page.config(f"dead_units/mnist_vgg_{optimizer}.yaml"), *page.data,
        "--trainer.callbacks+=Sharpness", "--trainer.callbacks.every_n_steps", str(every),
        "--trainer.callbacks+=WeightSpectra",
    )  # fmt: skip
    return read_csv(folder / "metrics.csv")


def dead_units(page: Page) -> str:
    """Per optimizer, after chosen epochs: lambda_max against SGD's threshold (Adam: the preconditioned sharpness
    against its own), the trace, the spectra's means and the dead units."""
    lines = []
    for optimizer in OPTIMIZERS:
        rows = vgg(page, optimizer)
        sharp = sorted(rows_with(rows, "sharpness/lambda_max"), key=lambda r: int(r["step"]))
        spectra = sorted(rows_with(rows, "spectra/alpha_mean"), key=lambda r: int(r["epoch"]))
        dead = sorted(rows_with(rows, "dead/total"), key=lambda r: int(r["epoch"]))
        for epoch in [e for e in page.pick(EPOCHS, (1,)) if e <= len(spectra)]:
            s, w = sharp[min(epoch, len(sharp) - 1)], spectra[epoch - 1]
            if optimizer == "adam":
                edge = f"{float(s['sharpness/preconditioned']):,.0f} / {float(s['sharpness/preconditioned_threshold']):,.0f}"
            else:
                edge = f"{float(s['sharpness/lambda_max']):,.1f} / {float(s['sharpness/threshold']):,.0f}"
            lines.append([
                optimizer if epoch == page.pick(EPOCHS, (1,))[0] else "", str(epoch),
                f"{float(s['sharpness/lambda_max']):,.1f}", edge, f"{float(s['sharpness/trace']):,.0f}",
                f"{float(w['spectra/alpha_mean']):.2f}", f"{float(w['spectra/stable_rank_mean']):.1f}",
                f"{float(dead[epoch - 1]['dead/total']):.0f}" if epoch <= len(dead) else "",
            ])  # fmt: skip
    header = ["optimizer", "epoch", "lambda_max", "the edge: sharpness / its threshold", "trace", "alpha (mean)",
              "stable rank (mean)", "dead units"]  # fmt: skip
    return table(header, lines)


def student_runs(page: Page) -> tuple[Path, dict[str, Path]]:
    """The MNIST teacher and the students of docs/results/compression.md, fitted on the 10k split: the teacher's
    last checkpoint and each student's run folder."""
    data = ["--config", page.config("presets/mnist_10k.yaml"), *page.data]
    teacher = page.train("fit", "teacher", "--config", page.config("compression/mnist_teacher.yaml"), *data,
                         *smallest(page, "net"))  # fmt: skip
    checkpoint = teacher / "checkpoints" / "last.ckpt"
    students = {}
    for key, (_, extra) in STUDENTS.items():
        students[key] = page.train(
            "fit", key, "--config", page.config("compression/mnist_student.yaml"), *data,
            "--model.init_args.teacher_checkpoint", str(checkpoint), *extra, *smallest(page, "net", "teacher"),
        )  # fmt: skip
    return checkpoint, students


def students(page: Page) -> str:
    """Per student, the CKA of each of its block outputs with the teacher's same layer on the held-out images."""
    checkpoint, folders = student_runs(page)
    maps = {}
    for key, folder in folders.items():
        _, extra = STUDENTS[key]
        done = page.train(
            "similarity", f"similarity_{key}", "--config", page.config("compression/mnist_student.yaml"),
            "--config", page.config("presets/mnist_10k.yaml"), *page.data,
            "--model.init_args.teacher_checkpoint", str(checkpoint), *extra, *smallest(page, "net", "teacher"),
            "--checkpoints", str(folder / "checkpoints" / "last.ckpt"), "--teacher", "true",
        )  # fmt: skip
        maps[key] = {(r["a"], r["b"]): float(r["cka"]) for r in read_csv(done / "similarity.csv")}
    layers = list(dict.fromkeys(a for a, _ in next(iter(maps.values()))))
    lines = [[layer, *(f"{maps[key][layer, layer]:.3f}" for key in STUDENTS)] for layer in layers]
    lines.append(["mean", *(f"{sum(maps[k][n, n] for n in layers) / len(layers):.3f}" for k in STUDENTS)])
    return table(["layer (student against teacher)", *(label for label, _ in STUDENTS.values())], lines)


def plasticity(page: Page) -> str:
    """The permuted-labels stream under SGD (docs/results/plasticity.md's, without an intervention and with L2
    Init): per task, mean over seeds, the units' measures beside the weights' spectra."""
    rows = study(page, "sgd", "permuted_labels", *LABEL_INTERVENTIONS, figures=False)
    page.figure(page.folder("permuted_labels_sgd") / "mechanism.png", "curvature_plasticity_mechanism.png")
    tasks = sorted({r["task"] for r in rows})
    shown = [t for t in (0, 1, 2, 4, 9, 14, 19, 24, 29) if t in tasks] or tasks
    lines = []
    for name in dict.fromkeys(r["intervention"] for r in rows):
        for task in shown:
            own = [r for r in rows if r["intervention"] == name and r["task"] == task]
            lines.append([
                name if task == shown[0] else "", str(task), f"{mean_of(own, 'acc_online'):.3f}",
                f"{mean_of(own, 'dead'):.3f}", f"{mean_of(own, 'dormant'):.3f}", f"{mean_of(own, 'srank'):.0f}",
                f"{mean_of(own, 'weight_norm'):.1f}", f"{mean_of(own, 'stable_rank'):.2f}", f"{mean_of(own, 'alpha'):.2f}",
            ])  # fmt: skip
    header = ["intervention", "task", "online acc", "dead share", "dormant share", "srank", "weight norm",
              "stable rank (mean)", "alpha (hidden layer)"]  # fmt: skip
    return table(header, lines)


BLOCKS = {"curvature/dead-units": dead_units, "curvature/students": students, "curvature/plasticity": plasticity}


def main(argv: list[str] | None = None) -> None:
    regenerate("curvature", BLOCKS, argv, seeds)


if __name__ == "__main__":
    main(sys.argv[1:])
