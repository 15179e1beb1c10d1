"""Regenerate docs/results/curvature.md: spec 08's measures on this project's own questions, on the 10k split: the
sharpness and weight spectra of the dead-unit study's VGG under Adam and under SGD, how similar the compressed
MNIST students are to their teacher, layer by layer, with and without attention transfer, and the weight spectra
per task of a permuted-labels stream beside its dormant units, and whether the sharpness of a deep delta-orthogonal
tanh net crosses the edge of stability where its training collapses, across learning rates.

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
    probe = page.pick([], ["--trainer.callbacks.probe_samples", "32", "--trainer.callbacks.iterations", "4",
                           "--trainer.callbacks.trace_probes", "2"])  # a smoke run's measurement: a few products  # fmt: skip
    folder = page.train(
        "fit", f"vgg_{optimizer}", "--config", page.config(f"dead_units/mnist_vgg_{optimizer}.yaml"), *page.data,
        "--trainer.callbacks+=Sharpness", "--trainer.callbacks.every_n_steps", str(every), *probe,
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


def chosen(page: Page) -> dict[str, tuple[str, list[str]]]:
    """The students: all four, or in a smoke run the `Shuffle_4` pair whose maps the page shows."""
    return page.pick(STUDENTS, {k: v for k, v in STUDENTS.items() if k.startswith("shuffle4")})


def teacher_args(page: Page) -> list[str]:
    """The MNIST teacher's config on the 10k split (smallest in a smoke run)."""
    return ["--config", page.config("compression/mnist_teacher.yaml"), "--config", page.config("presets/mnist_10k.yaml"),
            *page.data, *smallest(page, "net")]  # fmt: skip


def student_runs(page: Page) -> tuple[Path, dict[str, Path]]:
    """The MNIST teacher and the students of docs/results/compression.md, fitted on the 10k split: the teacher's
    last checkpoint and each student's run folder."""
    data = ["--config", page.config("presets/mnist_10k.yaml"), *page.data]
    teacher = page.train("fit", "teacher", *teacher_args(page))
    checkpoint = teacher / "checkpoints" / "last.ckpt"
    students = {}
    for key, (_, extra) in chosen(page).items():
        students[key] = page.train(
            "fit", key, "--config", page.config("compression/mnist_student.yaml"), *data,
            "--model.init_args.teacher_checkpoint", str(checkpoint), *extra, *smallest(page, "net", "teacher"),
        )  # fmt: skip
    return checkpoint, students


def students(page: Page) -> str:
    """Per student, the CKA of each of its block outputs with the teacher's same layer on the held-out images: the
    features averaged over positions, and kept at every position (where attention transfer acts)."""
    checkpoint, folders = student_runs(page)
    maps = {}
    for key, folder in folders.items():
        _, extra = STUDENTS[key]
        for conv in ("pool", "flatten"):
            done = page.train(
                "similarity", f"similarity_{key}_{conv}", "--config", page.config("compression/mnist_student.yaml"),
                "--config", page.config("presets/mnist_10k.yaml"), *page.data,
                "--model.init_args.teacher_checkpoint", str(checkpoint), *extra, *smallest(page, "net", "teacher"),
                "--checkpoints", str(folder / "checkpoints" / "last.ckpt"), "--teacher", "true", "--conv", conv,
            )  # fmt: skip
            maps[key, conv] = {(r["a"], r["b"]): float(r["cka"]) for r in read_csv(done / "similarity.csv")}
            if key.startswith("shuffle4") and conv == "pool":
                page.figure(done / "similarity.png", f"curvature_cka_{key}.png")
    # the baseline: a second teacher, another seed, against the first: how close two nets of this size come alone
    data = teacher_args(page)
    other = page.train("fit", "teacher_seed1", *data, "--seed_everything", "1") / "checkpoints" / "last.ckpt"
    for conv in ("pool", "flatten"):
        done = page.train("similarity", f"similarity_teachers_{conv}", *data, "--conv", conv,
                          "--checkpoints", f"[{other},{checkpoint}]")  # fmt: skip
        maps["teachers", conv] = {(r["a"], r["b"]): float(r["cka"]) for r in read_csv(done / "similarity.csv")}
    layers = list(dict.fromkeys(a for a, _ in next(iter(maps.values()))))
    columns = [*folders, "teachers"]

    def cell(key: str, chosen: list[str]) -> str:
        return " / ".join(f"{sum(maps[key, c][n, n] for n in chosen) / len(chosen):.3f}" for c in ("pool", "flatten"))

    lines = [[layer, *(cell(key, [layer]) for key in columns)] for layer in layers]
    lines.append(["mean", *(cell(key, layers) for key in columns)])
    header = ["layer: CKA with the teacher's, pooled / every position", *(STUDENTS[key][0] for key in folders),
              "another teacher (seed 1)"]  # fmt: skip
    return table(header, lines)


DEPTH, LRS = 99, (0.01, 0.003, 0.001)  # where delta-orthogonal tanh collapsed at lr 0.01 (docs/results/depth.md)


def depth_lr(page: Page) -> str:
    """Delta-orthogonal tanh at k = 99 for the original's 705 SGD steps at each learning rate, Sharpness every 50
    steps on a probe of 128 images (one trace probe: lambda_max is the question), and lr 0.01's first 60 steps
    again with a measurement every 5: lambda_max against SGD's threshold (2 + 2 momentum) / lr, the last errors."""
    runs = [(f"{lr:g}", f"delta_orthogonal_lr{lr:g}", lr, page.pick(50, 1), []) for lr in page.pick(LRS, LRS[:1])]
    runs.append(("0.01, its first 60 steps", "delta_orthogonal_lr0.01_early", 0.01, page.pick(5, 1),
                 ["--trainer.max_steps", page.pick("60", "2")]))  # fmt: skip
    lines = []
    for label, key, lr, every, extra in runs:
        folder = page.train(
            "fit", key, "--config", page.config("depth/tanh_delta_orthogonal.yaml"),
            "--config", page.config("presets/mnist_10k.yaml"), "--config", page.config("presets/original_steps.yaml"),
            *page.data, "--model.init_args.net.init_args.depth", str(page.pick(DEPTH, 6)),
            "--model.init_args.optimizer.lr", str(lr), "--trainer.callbacks+=Sharpness",
            "--trainer.callbacks.every_n_steps", str(every), "--trainer.callbacks.probe_samples", "128",
            "--trainer.callbacks.trace_probes", "1", *extra,
        )  # fmt: skip
        rows = read_csv(folder / "metrics.csv")
        sharp = sorted(rows_with(rows, "sharpness/lambda_max"), key=lambda r: int(r["step"]))
        threshold = float(sharp[0]["sharpness/threshold"])
        values = [(int(r["step"]), float(r["sharpness/lambda_max"])) for r in sharp]
        top_step, top = max(values, key=lambda v: v[1])
        crossed = next((step for step, value in values if value > threshold), None)
        val = rows_with(rows, "val/err")
        lines.append([
            label, f"every {every}", f"{threshold:,.0f}", f"{values[0][1]:,.1f}", f"{top:,.1f} (step {top_step})",
            f"{values[-1][1]:,.1f} (step {values[-1][0]})", "never" if crossed is None else f"step {crossed}",
            f"{float(val[-1]['val/err']):.3f} (step {val[-1]['step']})" if val else "",
        ])  # fmt: skip
    header = ["lr", "measured", "threshold (2 + 2 momentum) / lr", "lambda_max at step 0", "largest", "last",
              "above the threshold from", "last val error"]  # fmt: skip
    return table(header, lines)


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


BLOCKS = {
    "curvature/dead-units": dead_units,
    "curvature/students": students,
    "curvature/plasticity": plasticity,
    "curvature/depth-lr": depth_lr,
}


def main(argv: list[str] | None = None) -> None:
    regenerate("curvature", BLOCKS, argv, seeds)


if __name__ == "__main__":
    main(sys.argv[1:])
