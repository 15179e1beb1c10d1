"""Parameters and mult-adds of a network, in the convention of the original `count.py`.

Mult-adds: every multiply-add of convolutions (grouped and depthwise exactly: C_in/groups
per output element per kernel tap; no bias) and linear layers (weights, plus one per bias),
plus one per output element of an activation function (k-winners included). Batch norm, pooling, dropout and
reshapes count zero. A layer of this project's own (hashed, ACDC, factorised 1x1 maps) counts
itself through a `mult_adds(output)` method, and says where its count is a bound (`count_note`).
Measured with forward hooks on one sample of the given input shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_modules.layers.sparse_weights import SparseWeights

ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.ELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Softplus,
    nn.SELU,
    nn.CELU,
    nn.PReLU,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
)


@dataclass
class LayerCount:
    """One leaf module's share: its name, type, output shape, own parameters and mult-adds."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    mult_adds: int
    nonzero_mult_adds: int = -1  # counting only the weights a SparseWeights mask keeps; -1: as mult_adds

    def __post_init__(self) -> None:
        if self.nonzero_mult_adds < 0:
            self.nonzero_mult_adds = self.mult_adds


@dataclass
class CountResult:
    """A whole net's count: per-layer rows, totals, and the independent `sum(p.numel())` check."""

    layers: list[LayerCount] = field(default_factory=list)
    sanity_params: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def mult_adds(self) -> int:
        return sum(layer.mult_adds for layer in self.layers)

    @property
    def nonzero_mult_adds(self) -> int:
        """Mult-adds when the weights masked by SparseWeights are skipped."""
        return sum(layer.nonzero_mult_adds for layer in self.layers)

    def summary(self) -> str:
        """The original's three lines, then a note per kind of layer whose count is a bound."""
        lines = [
            f"Mult-Adds: {self.mult_adds:.5E}",
            f"Params: {self.params:.5E}",
            f"Sanity check, parameters: {self.sanity_params:.5E}",
        ]
        notes = list(self.notes)
        if self.nonzero_mult_adds < self.mult_adds:
            notes.append(
                f"with only the non-zero weights (sparse weights), mult-adds are {self.nonzero_mult_adds:.5E} "
                f"({self.nonzero_mult_adds / self.mult_adds:.1%} of the dense count above)"
            )
        return "\n".join(lines + [f"Note: {note}" for note in notes])

    def table(self) -> str:
        """A per-layer table, in Markdown."""
        rows = ["| layer | type | output | params | mult-adds |", "| --- | --- | --- | ---: | ---: |"]
        rows += [
            f"| {r.name} | {r.kind} | {'x'.join(map(str, r.output_shape))} | {r.params:,} | {r.mult_adds:,} |"
            for r in self.layers
            if r.params or r.mult_adds
        ]
        rows.append(f"| total | | | {self.params:,} | {self.mult_adds:,} |")
        return "\n".join(rows)


def layer_mult_adds(module: nn.Module, output: torch.Tensor) -> int:
    """Mult-adds of one leaf module for one sample, given its output."""
    if callable(getattr(module, "mult_adds", None)):
        return module.mult_adds(output)
    if isinstance(module, nn.modules.conv._ConvNd):
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return output[0].numel() * per_output
    if isinstance(module, nn.Linear):
        positions = output[0].numel() // module.out_features  # a Linear over extra dims repeats per position
        return positions * (module.weight.numel() + (module.bias.numel() if module.bias is not None else 0))
    if isinstance(module, ACTIVATIONS):
        return output[0].numel()
    return 0


def layer_nonzero_mult_adds(module: nn.Module, output: torch.Tensor, dense: int, mask: torch.Tensor | None) -> int:
    """Mult-adds of one leaf module for one sample when the weights its SparseWeights `mask` zeroes are skipped
    (conv and linear). Without a mask it is dense: a weight that happens to be 0.0 is not sparsity. A mask on the
    meta device has no values: counted dense too."""
    if mask is None or mask.is_meta:
        return dense
    if isinstance(module, nn.modules.conv._ConvNd):
        positions = output[0].numel() // module.out_channels
        return positions * int(torch.count_nonzero(mask))
    if isinstance(module, nn.Linear):
        positions = output[0].numel() // module.out_features
        bias = module.bias.numel() if module.bias is not None else 0
        return positions * (int(torch.count_nonzero(mask)) + bias)
    return dense


def count(net: nn.Module, input_shape: tuple[int, ...]) -> CountResult:
    """Count `net` on one sample of `input_shape` (C, H, W); the net's mode and weights are left as they were."""
    notes = dict.fromkeys(note for m in net.modules() if (note := getattr(m, "count_note", None)))
    masks = {m.module: m.weight_mask for m in net.modules() if isinstance(m, SparseWeights)}
    result = CountResult(sanity_params=sum(p.numel() for p in net.parameters()), notes=list(notes))
    handles, seen = [], set()

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        mult_adds = layer_mult_adds(module, output)
        result.layers.append(
            LayerCount(
                name=names[module],
                kind=type(module).__name__,
                output_shape=tuple(output.shape[1:]),
                params=0 if module in seen else sum(p.numel() for p in module.parameters(recurse=False)),
                mult_adds=mult_adds,
                nonzero_mult_adds=layer_nonzero_mult_adds(module, output, mult_adds, masks.get(module)),
            )
        )
        seen.add(module)  # a module called twice (a shared ReLU) costs twice but owns its parameters once

    names = {}
    for name, module in net.named_modules():
        if not list(module.children()) or isinstance(module, ACTIVATIONS):
            names[module] = name
            handles.append(module.register_forward_hook(hook))
    # parameters owned directly by non-leaf modules are not seen by leaf hooks: count them once here
    owner_params = [
        (name, m)
        for name, m in net.named_modules()
        if list(m.children()) and any(True for _ in m.parameters(recurse=False))
    ]
    was_training = net.training
    parameter = next(net.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, *input_shape, device=device))
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    for name, module in owner_params:
        result.layers.append(
            LayerCount(name, type(module).__name__, (), sum(p.numel() for p in module.parameters(recurse=False)), 0)
        )
    return result


def count_model(model: nn.Module, datamodule: object = None, input_shape: tuple[int, ...] | None = None) -> CountResult:
    """Count a trained model's `net` (or the model itself) on `input_shape`, by default the datamodule's."""
    shape = input_shape or getattr(datamodule, "input_shape", None)
    if shape is None:
        raise ValueError("counting needs input_shape (C, H, W), or a datamodule with an `input_shape` attribute")
    return count(getattr(model, "net", model), tuple(shape))
