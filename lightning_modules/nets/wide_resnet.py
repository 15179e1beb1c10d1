"""WRN-d-k for CIFAR (Zagoruyko & Komodakis), the teacher and students of research line 4.

A 3x3 stem conv to 16 channels; three groups of n = (d - 4) / 6 pre-activation basic blocks with
widths 16k, 32k, 64k and strides 1, 2, 2; a 1x1 shortcut conv where the shape changes; a final
BN-ReLU, global average pool and linear. Every 3x3 conv inside the blocks is built by
`layers.substitute_conv` from the `conv` string, so a student is the same net with `conv: Shuffle_4`;
the 1x1 shortcuts stay full convs, as in the original (`substitute_shortcuts` replaces them too). Counts: WRN-28-10 36,479,194 parameters, WRN-40-2 2,243,546, WRN-16-2 691,674.
With `checkpoint_blocks`, each block keeps only its input for the backward pass and recomputes
the rest (activation checkpointing: less memory, about a fifth more time per step).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.errors import require
from lightning_modules.layers.checkpointing import CheckpointableBlock
from lightning_modules.layers.substitutes import (
    GroupedInit,
    fit_budget,
    full_conv,
    init_convs,
    parse_substitute,
    substitute_conv,
)


def full_conv_of(conv: str, in_ch: int, out_ch: int, kernel_size: int, stride: int, padding: int) -> nn.Conv2d:
    """A plain conv whatever the substitute: the original's 1x1 shortcuts stay full convolutions."""
    return full_conv(in_ch, out_ch, kernel_size, stride, padding)


class WideBlock(CheckpointableBlock):
    """Pre-activation basic block: BN-ReLU-conv(stride)-BN-ReLU-conv, plus the input or a 1x1 shortcut
    of the activated input where the shape changes (as the original WRN code does)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        conv: str = "Conv",
        dropout: float = 0.0,
        checkpointed: bool = False,
        substitute_shortcut: bool = False,
    ):
        super().__init__()
        self.checkpointed = checkpointed
        self.bn1, self.act1 = nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True)
        self.conv1 = substitute_conv(conv, in_ch, out_ch, 3, stride)
        self.bn2, self.act2 = nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv2 = substitute_conv(conv, out_ch, out_ch, 3, 1)
        shortcut = substitute_conv if substitute_shortcut else full_conv_of
        self.shortcut = shortcut(conv, in_ch, out_ch, 1, stride, 0) if in_ch != out_ch or stride != 1 else None

    def body(self, x: torch.Tensor) -> torch.Tensor:
        o = self.act1(self.bn1(x))
        y = self.conv2(self.drop(self.act2(self.bn2(self.conv1(o)))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-`depth`-`width` with every block conv replaced by the substitute named `conv`."""

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        conv: str = "Conv",
        dropout: float = 0.0,
        budget: float | None = None,
        checkpoint_blocks: bool = False,
        substitute_shortcuts: bool = False,
        grouped_conv_init: GroupedInit = "original",
    ):
        """
        Args:
            depth: d; (d - 4) must be divisible by 6 (16, 22, 28, 40, ...).
            width: k, the widening factor.
            num_classes: outputs.
            in_channels: image channels (3 for CIFAR, 1 for MNIST).
            conv: the block convs' substitute: `Conv` (the teacher), `Sep`, `Generic_<r>`, `Shuffle_<g>`,
                `SepHashed_<s>`, `ACDC_<n>`, `TensorTrain_<r>`, `Tucker_<r>`, `CP_<r>`.
            dropout: dropout between the two convs of a block (0 in the spec).
            budget: a parameter budget for the whole net: `conv`'s hyperparameter (r, g, s or n) is chosen
                so the net has the most parameters at or under it, and printed.
            checkpoint_blocks: recompute each block's activations in the backward pass instead of
                keeping them (the same gradients, less memory, more time).
            substitute_shortcuts: build the 1x1 shortcut convs from `conv` too; by default they stay full
                convolutions, as in the original, which replaced every 3x3 conv only.
            grouped_conv_init: every conv starts He-normal from its fan-out k*k*C_out; `original` (the default,
                the original code's) counts all C_out for grouped and depthwise convs too, so a substitute's
                depthwise 3x3 over C channels starts with C times less variance than He init; `per_group`
                divides the fan-out by the groups, He init's variance for those convs too.
        """
        require("positive", width=width, num_classes=num_classes, in_channels=in_channels, budget=budget)
        require("fraction", dropout=dropout)
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if budget is None:
            parse_substitute(conv)  # a bad name fails here, with the list of names
        else:
            shape = (depth, width, num_classes, in_channels)
            conv, params = fit_budget(conv, lambda name: _params_on_meta(*shape, name, substitute_shortcuts), budget)
            coarse = "" if params >= 0.98 * budget else "; the nearest at or under it that this substitute allows"
            print(f"budget {budget:,.0f} parameters: conv {conv} gives {params:,} ({params / budget - 1:+.2%}{coarse})")
        self.depth, self.width, self.conv, self.substitute_shortcuts = depth, width, conv, substitute_shortcuts
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.group1, self.group2, self.group3 = (
            nn.Sequential(
                *(
                    WideBlock(
                        widths[g] if i == 0 else widths[g + 1],
                        widths[g + 1],
                        stride if i == 0 else 1,
                        conv,
                        dropout,
                        checkpoint_blocks,
                        substitute_shortcuts,
                    )
                    for i in range(n)
                )
            )
            for g, stride in enumerate((1, 2, 2))
        )
        self.bn, self.act = nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True)
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        init_convs(self, grouped_conv_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.group3(self.group2(self.group1(self.stem(x))))
        return self.fc(self.flatten(self.pool(self.act(self.bn(x)))))

    def extra_repr(self) -> str:
        return f"WRN-{self.depth}-{self.width}, conv={self.conv}, substitute_shortcuts={self.substitute_shortcuts}"


def _params_on_meta(
    depth: int, width: int, num_classes: int, in_channels: int, conv: str, substitute_shortcuts: bool
) -> int:
    """The parameter count of a WRN built on the meta device: shapes only, no memory, no initialisation."""
    with torch.device("meta"):
        net = WideResNet(depth, width, num_classes, in_channels, conv, substitute_shortcuts=substitute_shortcuts)
    return sum(p.numel() for p in net.parameters())
