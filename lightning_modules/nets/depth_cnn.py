"""The depth-trainability CNN: one skeleton for all seven variants of research line 1.

k 3x3 convs in 3 stages (4, 8, 16 channels), each stage ending in a 2x2 average pool
(28 -> 14 -> 7 -> 3), then one linear layer 144 -> 10. Activation, batch norm, residual
connections and the conv init are switches; see configs/depth/ for the seven variants.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from lightning_modules.errors import require
from lightning_modules.layers.cpu_fast import ELU, BatchNorm2d
from lightning_modules.layers.delta_orthogonal import delta_orthogonal_conv, init_bias
from lightning_modules.layers.recycling import (
    Draw,
    UnitGroup,
    chain_units,
    normal_draw,
    passes_gradient_at_zero,
    uniform_draw,
)
from lightning_modules.statistics.mean_field import critical_sigma_w2, padded_conv_factor

ACTIVATIONS = {"tanh": nn.Tanh, "elu": ELU, "relu": nn.ReLU}  # ELU, BatchNorm2d: faster on a CPU (layers.cpu_fast)


class DepthBlock(nn.Module):
    """conv -> [BN] -> activation, plus the input when `residual` (never on a channel change)."""

    def __init__(self, c_in: int, c_out: int, activation: str, batch_norm: bool, residual: bool):
        super().__init__()
        if residual and c_in != c_out:
            raise ValueError(f"a residual block needs c_in == c_out, got {c_in} -> {c_out}")
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = BatchNorm2d(c_out) if batch_norm else nn.Identity()
        self.act = ACTIVATIONS[activation]()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm(self.conv(x)))
        return out + x if self.residual else out

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


class DepthCNN(nn.Module):
    """k convs in 3 stages + linear head; the spec's seven depth variants are settings of this class."""

    def __init__(
        self,
        depth: int = 9,
        activation: Literal["tanh", "elu", "relu"] = "tanh",
        batch_norm: bool = False,
        residual: bool = False,
        init_std: float | Literal["fan_in", "fan_out"] = "fan_in",
        init: Literal["normal", "delta_orthogonal"] = "normal",
        gain: float | Literal["critical"] = 1.0,
        bias_std: float = 0.0,
        widths: tuple[int, int, int] = (4, 8, 16),
        in_channels: int = 1,
        input_size: int = 28,
        num_classes: int = 10,
    ):
        """
        Args:
            depth: number of conv layers k, divisible by 3 (k/3 per stage).
            activation: nonlinearity after every conv.
            batch_norm: BatchNorm2d between conv and activation.
            residual: add the block input to every conv block but the first of each stage.
            init_std: conv weight std: a number (the spec's 0.05), or `fan_in` = sqrt(1/(9 C_in)),
                `fan_out` = sqrt(1/(9 C_out)). Used by the `normal` init.
            init: `normal` (N(0, init_std^2) weights) or `delta_orthogonal` (spec 06: zero kernels but an
                orthogonal centre tap times `gain`; `init_std` then plays no part).
            gain: the delta-orthogonal centre tap's gain (mean-field sigma_w = gain), or `critical`: the gain at
                which chi_1 = 1 for this activation and `bias_std` (tanh: 1 at bias_std 0, where the signal
                still fades as a power law; 1.46 at bias_std 0.38, where q* is about 1; ReLU: sqrt 2, He's, at any
                bias_std).
            bias_std: conv biases start N(0, bias_std^2) (mean-field sigma_b); 0: zero.
            widths: channels of the three stages.
            in_channels: image channels.
            input_size: image height and width (square).
            num_classes: logits.
        """
        require("non_negative", bias_std=bias_std)
        if init not in ("normal", "delta_orthogonal"):
            raise ValueError(f"init must be 'normal' or 'delta_orthogonal', got {init!r}")
        if init == "normal" and gain != 1.0:
            raise ValueError("gain is the delta-orthogonal init's: with init 'normal' set init_std instead")
        if gain == "critical":
            gain = math.sqrt(critical_sigma_w2(bias_std**2, activation))
        elif isinstance(gain, str) or gain <= 0:
            raise ValueError(f"gain must be a positive number or 'critical', got {gain!r}")
        require("positive", in_channels=in_channels, input_size=input_size, num_classes=num_classes,
                **{f"widths[{i}]": w for i, w in enumerate(widths)})  # fmt: skip
        super().__init__()
        if depth < 3 or depth % 3:
            raise ValueError(f"depth must be a positive multiple of 3, got {depth}")
        self.settings = dict(
            depth=depth,
            activation=activation,
            batch_norm=batch_norm,
            residual=residual,
            init_std=init_std,
            init=init,
            gain=gain,
            bias_std=bias_std,
            widths=tuple(widths),
            in_channels=in_channels,
            input_size=input_size,
            num_classes=num_classes,
        )
        layers: list[nn.Module] = []
        c_in, size = in_channels, input_size
        for width in widths:
            for i in range(depth // 3):
                layers.append(DepthBlock(c_in if i == 0 else width, width, activation, batch_norm, residual and i > 0))
            layers.append(nn.AvgPool2d(2))
            c_in, size = width, size // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in * size * size, num_classes)
        self.reset_conv_parameters(init_std)

    def conv_std(self, conv: nn.Conv2d) -> float:
        """The std of a conv's N(0, std^2) init: `init_std`, or sqrt(1 / (9 C)) with C its fan-in or fan-out channels."""
        init_std = self.settings["init_std"]
        if not isinstance(init_std, str):
            return float(init_std)
        fan = {"fan_in": conv.in_channels, "fan_out": conv.out_channels}.get(init_std)
        if fan is None:
            raise ValueError(f"init_std must be a number, 'fan_in' or 'fan_out', got {init_std!r}")
        return math.sqrt(1.0 / (9 * fan))

    def reset_conv_parameters(self, init_std: float | str) -> None:
        settings = self.settings
        for module in self.features.modules():
            if isinstance(module, nn.Conv2d):
                if settings["init"] == "delta_orthogonal":
                    delta_orthogonal_conv(module, settings["gain"], settings["bias_std"])
                    continue
                nn.init.normal_(module.weight, 0.0, self.conv_std(module))
                init_bias(module, settings["bias_std"])

    def reset_parameters(self) -> None:
        """The convs drawn again from the net's own init (what shrink and perturb draws fresh weights from)."""
        self.reset_conv_parameters(self.settings["init_std"])

    def weight_variance(self, conv: nn.Conv2d) -> float:
        """Mean-field theory's sigma_w^2 of a conv at initialisation: 9 C_in std^2 for N(0, std^2) weights (Xiao et
        al., 2018), gain^2 for the delta-orthogonal init."""
        if self.settings["init"] == "delta_orthogonal":
            return float(self.settings["gain"]) ** 2
        return 9 * conv.in_channels * self.conv_std(conv) ** 2

    def padding_factor(self, size: int) -> float:
        """Zero padding's factor on q per conv at a size x size map (`mean_field.padded_conv_factor`); 1 for the
        delta-orthogonal init, whose one tap, the centre, never reads the padding."""
        return 1.0 if self.settings["init"] == "delta_orthogonal" else padded_conv_factor(size)

    def init_draw(self, layer: nn.Conv2d | nn.Linear) -> Draw:
        """The distribution a layer's weights start from: N(0, std^2) for a conv; PyTorch's default for the head."""
        if isinstance(layer, nn.Conv2d):
            return normal_draw(self.conv_std(layer))
        return uniform_draw(1 / math.sqrt(layer.in_features))

    def recyclable_units(self) -> dict[str, UnitGroup | str]:
        """Each block's units (channels) for recycling (layers.recycling), with the net's own N(0, std^2) init. In a
        plain net a channel's outgoing weights are the next conv's input channel (the head's block of 9 columns
        after the last pool). In a residual net every block adds its channels into the stream, which has no
        weights to zero: a block is silenced at its batch norm instead, and without one, or with an activation
        whose gradient at 0 is 0 (ReLU: the silenced unit would never train again), it cannot be recycled."""
        if self.settings["init"] == "delta_orthogonal":
            why = "a delta-orthogonal kernel is orthogonal across units: one unit cannot be drawn again alone"
            return {f"features.{i}": why for i, block in enumerate(self.features) if isinstance(block, DepthBlock)}
        if not self.settings["residual"]:
            leaves = [(f"features.{name}", m) for name, m in self.features.named_modules() if not list(m.children())]
            return chain_units([*leaves, ("head", self.head)], self.init_draw)
        groups: dict[str, UnitGroup | str] = {}
        for i, block in enumerate(self.features):
            if isinstance(block, DepthBlock):
                name = f"features.{i}"
                if not isinstance(block.norm, nn.BatchNorm2d):
                    groups[name] = (
                        "a residual block without batch norm adds its channels into the stream through no weight: "
                        "recycling one would change what the net computes"
                    )
                    continue
                if not passes_gradient_at_zero(block.act):
                    groups[name] = (
                        f"a residual block is silenced at its batch norm to {self.settings['activation']}(0) = 0, "
                        "where its gradient is 0: the unit would never train again (recycle elu or tanh nets)"
                    )
                    continue
                draw = self.init_draw(block.conv)
                groups[name] = UnitGroup(name, block.conv, draw, block.act, block.norm, silence_by_norm=True)
        return groups

    def at_depth(self, depth: int) -> DepthCNN:
        """A freshly initialised net with the same settings at another depth (used by `search`)."""
        return DepthCNN(**{**self.settings, "depth": depth})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))
