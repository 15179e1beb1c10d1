"""The `similarity` subcommand (spec 08): minibatch CKA between the layers of trained nets on one split: a net's
layers against each other, one checkpoint's against another's (the same layers across training), or a student's
against its teacher's."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from callbacks.activation_observer import DEFAULT_TYPES, NoLayersError, select_layers
from lightning_modules.distillation import SET_TEACHER, load_teacher
from lightning_modules.errors import ConfigError
from lightning_modules.run.checkpoints import load_net
from lightning_modules.run.config_files import net_from_config
from lightning_modules.run.files import atomic_savefig, atomic_write, atomic_write_csv
from lightning_modules.statistics.similarity import MinibatchCKA, features
from lightning_modules.studies.noise import checkpoint_label
from lightning_modules.studies.study import Study

FILES = {"csv": "similarity.csv", "md": "similarity.md", "plot": "similarity.png"}


@dataclass
class Side:
    """One side of the map: a net in eval mode, its name in the files, and its chosen layers by report name."""

    name: str
    net: nn.Module
    layers: dict[str, nn.Module]


def run_similarity(
    study: Study,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    checkpoints: list[str] | str | None,
    teacher: bool,
    layers: list[str],
    types: list[str] | None,
    split: str,
    conv: str,
) -> torch.Tensor:
    """The `similarity` subcommand (its arguments are documented on the Trainer's method): the two sides' layers
    hooked, every minibatch of the split through both, the CKA map written and reported."""
    study.require_one_process("it evaluates on one device")
    paths = [checkpoints] if isinstance(checkpoints, str) else list(checkpoints or [])
    if not 1 <= len(paths) <= 2 or (teacher and len(paths) != 1):
        raise ConfigError(
            "similarity needs --checkpoints A.ckpt (A's layers against each other, or with --teacher true against its"
            " teacher's) or --checkpoints [A.ckpt,B.ckpt] (A's layers against B's)"
        )
    if split not in ("val", "test"):
        raise ConfigError(f"similarity --split must be val or test, not {split!r}")
    device = study.trainer.strategy.root_device
    chosen = (tuple(types) if types is not None else DEFAULT_TYPES, tuple(layers))
    own = teacher_of(model) if teacher else None  # refused before any checkpoint is read
    a = side(model, Path(paths[0]), chosen, device)
    if own is not None:
        b = Side("teacher", own.to(device).eval(), pick(own, chosen, "the teacher"))
    elif len(paths) == 2:
        b = side(model, Path(paths[1]), chosen, device)
    else:
        b = a
    study.set_up(datamodule, "validate" if split == "val" else "test")
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    cka = cka_map(a, b, loader, device, conv)
    written = write_similarity(cka, a, b, study.folder, f"linear CKA, minibatch, on the {split} split (convs: {conv})")
    print(written["md"].read_text())
    print(f"similarity results: {written['csv']}, {written['md']}, {written['plot']}")
    rows = [
        {"a": la, "b": lb, "cka": float(cka[i, j])} for i, la in enumerate(a.layers) for j, lb in enumerate(b.layers)
    ]
    study.report(tables={"similarity/cka": rows}, images={"similarity/cka_map": written["plot"]})
    return cka


def side(model: pl.LightningModule, path: Path, chosen: tuple, device: torch.device) -> Side:
    """A checkpoint's net (its own run's, from the `config.yaml` beside its `checkpoints/` folder; else this config's),
    its weights loaded, in eval mode on the device."""
    config = path.parent.parent / "config.yaml"
    net = net_from_config(config) if config.is_file() else copy.deepcopy(model.net)
    load_net(net, path)
    net.to(device).eval()
    return Side(checkpoint_label(path), net, pick(net, chosen, f"checkpoint {path}'s net"))


def teacher_of(model: pl.LightningModule) -> nn.Module:
    """A student's teacher, its weights loaded from the config's `teacher_checkpoint`."""
    if not isinstance(getattr(model, "teacher", None), nn.Module):
        raise ConfigError(f"--teacher true needs a student's config; {type(model).__name__} has no teacher")
    if not model.teacher_loaded:
        if model.teacher_checkpoint is None:
            raise ConfigError(f"--teacher true needs the student's teacher: {SET_TEACHER}")
        load_teacher(model.teacher, model.teacher_checkpoint)
        model.teacher_loaded = True
    return model.teacher


def pick(net: nn.Module, chosen: tuple, what: str) -> dict[str, nn.Module]:
    layers = select_layers(net, *chosen)
    if not layers:
        raise NoLayersError(f"no layer of {what} matches --types {list(chosen[0])} and --layers {list(chosen[1])}")
    return layers


@torch.no_grad()
def cka_map(a: Side, b: Side, loader, device: torch.device, conv: str) -> torch.Tensor:
    """The (layers of a, layers of b) minibatch CKA over the loader's batches (those of fewer than 4 samples left
    out: the unbiased HSIC needs 4)."""
    outputs: dict[tuple[int, str], torch.Tensor] = {}

    def keep(key: tuple[int, str]):
        def hook(module, inputs, output) -> None:
            outputs[key] = features(output, conv)

        return hook

    sides = (a,) if b is a else (a, b)  # one net against itself runs once a batch
    hooks = [m.register_forward_hook(keep((i, n))) for i, s in enumerate(sides) for n, m in s.layers.items()]
    accumulator = MinibatchCKA(len(a.layers), len(b.layers), device)
    try:
        for x, *_ in loader:
            if len(x) < 4:
                continue
            x = x.to(device)
            for s in sides:
                s.net(x)
            last = len(sides) - 1
            accumulator.update([outputs[0, n] for n in a.layers], [outputs[last, n] for n in b.layers])
    finally:
        for hook in hooks:
            hook.remove()
    return accumulator.compute().cpu()


def write_similarity(cka: torch.Tensor, a: Side, b: Side, folder: Path, note: str) -> dict[str, Path]:
    """similarity.csv (a row per pair of layers), similarity.md (the map as a table), similarity.png (a heatmap)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / name for kind, name in FILES.items()}
    rows = ({"a": la, "b": lb, "cka": f"{float(cka[i, j]):.6f}"} for i, la in enumerate(a.layers)
            for j, lb in enumerate(b.layers))  # fmt: skip
    atomic_write_csv(paths["csv"], ["a", "b", "cka"], rows)
    lines = [f"| {a.name} \\ {b.name} | " + " | ".join(b.layers) + " |", "| --- |" + " ---: |" * len(b.layers)]
    lines += [f"| {la} | " + " | ".join(f"{float(v):.3f}" for v in cka[i]) + " |" for i, la in enumerate(a.layers)]
    atomic_write(paths["md"], f"{note}: {a.name} (rows) against {b.name} (columns).\n\n" + "\n".join(lines) + "\n")
    heatmap(cka, a, b, paths["plot"])
    return paths


def heatmap(cka: torch.Tensor, a: Side, b: Side, path: Path) -> None:
    """The map as an image, 0 to 1, rows a's layers in network order from the top."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size = min(14, 3 + 0.35 * max(len(a.layers), len(b.layers)))
    figure = Figure(figsize=(size + 1.5, size), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    image = ax.imshow(cka.numpy(), vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(b.layers)), list(b.layers), rotation=90, fontsize=7)
    ax.set_yticks(range(len(a.layers)), list(a.layers), fontsize=7)
    ax.set_xlabel(b.name, fontsize=9)
    ax.set_ylabel(a.name, fontsize=9)
    ax.set_title("linear CKA (minibatch)", fontsize=10)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    figure.tight_layout()
    atomic_savefig(figure, path)
