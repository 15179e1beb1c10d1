"""VGG nets described by the original dead-unit study's list format (research line 2).

    model_conf = [("conv1_1", (64, None)), ("pool1", (2, 2)), ..., ("conv5_2", (512, 0.5)),
                  ("pool5", (2, 2)), ("drop5", (None, 0.5)), ("fc6", (512, 0.5)),
                  ("logit", (None, None)), ("flatter", (None, None))]

An entry's kind is its name's letters: `conv` (3x3 conv, padding 1, [BN], ReLU, [dropout p]),
`pool` (max pool (kernel, stride)), `drop` (dropout p), `fc` (linear, ReLU, [dropout p]),
`logit` (linear to the classes), `flatter` (flatten). The first fc/logit flattens its input.
Blocks are named after their entry (`conv1_1`, `fc6`), so per-layer reports read like the original.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Literal

from torch import nn

from lightning_modules.errors import require
from lightning_modules.layers.recycling import Draw, UnitGroup, chain_units, normal_draw, uniform_draw

LayerSpec = tuple[str, tuple[int | None, float | None]]


def _dropout(p: float | None, spatial: bool) -> OrderedDict:
    if p is None or p == 0:
        return OrderedDict()
    return OrderedDict(drop=nn.Dropout2d(p) if spatial else nn.Dropout(p))


class ConvBlock(nn.Sequential):
    """3x3 conv (padding 1) -> [BatchNorm] -> ReLU -> [dropout]."""

    def __init__(self, c_in: int, c_out: int, batch_norm: bool, dropout: float | None, dropout2d: bool):
        parts = OrderedDict(conv=nn.Conv2d(c_in, c_out, 3, padding=1))
        if batch_norm:
            parts["norm"] = nn.BatchNorm2d(c_out)
        parts["act"] = nn.ReLU(inplace=True)
        super().__init__(parts | _dropout(dropout, dropout2d))


class LinearBlock(nn.Sequential):
    """linear -> ReLU -> [dropout]."""

    def __init__(self, n_in: int, n_out: int, dropout: float | None):
        super().__init__(
            OrderedDict(linear=nn.Linear(n_in, n_out), act=nn.ReLU(inplace=True)) | _dropout(dropout, False)
        )


class VGG(nn.Sequential):
    """A VGG-style net built from a list of (name, (width, dropout)) entries; see the module docstring."""

    def __init__(
        self,
        model_conf: list[LayerSpec],
        in_channels: int = 3,
        input_size: int = 32,
        num_classes: int = 10,
        dropout2d: bool = False,
        batch_norm: bool = False,
        init: Literal["fan_in", "fan_out", "torch"] = "fan_in",
    ):
        """
        Args:
            model_conf: the layers, in order, as (name, (width or pool kernel, dropout or pool stride)).
            in_channels: image channels.
            input_size: image height and width (square).
            num_classes: outputs of the `logit` entry.
            dropout2d: drop whole channels (Dropout2d) after convs and in `drop` entries on feature maps.
            batch_norm: BatchNorm2d between conv and ReLU (the original had none).
            init: He-normal std sqrt(2/n) with n = k*k*C_in (`fan_in`) or k*k*C_out (`fan_out`), the same
                rule with in/out features for linear layers, biases zero; or `torch`, PyTorch's default
                (uniform, std sqrt(1/(3n)), n = k*k*C_in): the smaller init the study compares He init with.
        """
        require("positive", in_channels=in_channels, input_size=input_size, num_classes=num_classes)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels, size, features = in_channels, input_size, None  # features: set once flattened
        for name, (width, extra) in model_conf:
            kind = re.match(r"[a-z]*", name).group()
            if name in layers:
                raise ValueError(f"model_conf: layer name {name!r} appears twice")
            if kind == "conv":
                if features is not None:
                    raise ValueError(f"model_conf: {name} comes after the net was flattened")
                layers[name] = ConvBlock(channels, int(width), batch_norm, extra, dropout2d)
                channels = int(width)
            elif kind == "pool":
                kernel, stride = int(width), int(extra if extra is not None else width)
                layers[name] = nn.MaxPool2d(kernel, stride)
                size = (size - kernel) // stride + 1
                if size < 1:
                    raise ValueError(f"model_conf: {name} shrinks the {input_size}px input below one pixel")
            elif kind == "drop":
                layers[name] = (nn.Dropout2d if dropout2d and features is None else nn.Dropout)(extra or 0.0)
            elif kind in ("fc", "logit"):
                if features is None:
                    layers["flatten"] = nn.Flatten()
                    features = channels * size * size
                if kind == "fc":
                    layers[name] = LinearBlock(features, int(width), extra)
                    features = int(width)
                else:
                    layers[name] = nn.Linear(features, num_classes)
                    features = num_classes
            elif kind == "flatter":
                layers[name] = nn.Flatten()
            else:
                raise ValueError(f"model_conf: unknown layer kind in {name!r} (conv, pool, drop, fc, logit, flatter)")
        if features != num_classes:
            raise ValueError("model_conf must end with a `logit` entry (optionally followed by `flatter`)")
        super().__init__(layers)
        self.init = init
        self.reset_parameters()

    def recyclable_units(self) -> dict[str, UnitGroup | str]:
        """Each conv and fc block's units for recycling (layers.recycling), with the net's own init: a conv channel's
        outgoing weights are the next conv's input channel, or the block of columns it becomes after the flatten."""
        leaves = [(name, m) for name, m in self.named_modules() if not list(m.children())]
        return chain_units(leaves, self.init_draw)

    def init_draw(self, module: nn.Conv2d | nn.Linear) -> Draw:
        """The distribution `reset_parameters` draws a layer's weights from."""
        fan_in = module.weight[0].numel()
        if self.init == "torch":  # PyTorch's default: kaiming_uniform with a = sqrt(5), bound 1 / sqrt(fan_in)
            return uniform_draw(1 / math.sqrt(fan_in))
        fan = fan_in if self.init == "fan_in" else module.weight.shape[0] * module.weight[0, 0].numel()
        return normal_draw(math.sqrt(2 / fan))

    def reset_parameters(self) -> None:
        if self.init not in ("fan_in", "fan_out", "torch"):
            raise ValueError(f"init must be 'fan_in', 'fan_out' or 'torch', got {self.init!r}")
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                if self.init == "torch":
                    module.reset_parameters()
                else:
                    nn.init.kaiming_normal_(module.weight, mode=self.init, nonlinearity="relu")
                    nn.init.zeros_(module.bias)

    def extra_repr(self) -> str:
        return f"init={self.init}"
