"""WRN-50-2 for ImageNet in torchvision's `wide_resnet50_2` layout, with a substitute for the 3x3 convs.

ResNet-50 with bottleneck blocks twice as wide inside (1x1 -> 3x3 -> 1x1 with 128, 256, 512, 1024
inner channels), stride on the 3x3 conv (ResNet v1.5). With `conv: Conv` it is torchvision's net
module for module, so its weights load as they are (68,883,240 parameters, 11.4e9 mult-adds at 224
x 224); a student swaps each block's 3x3 conv for a cheap substitute (the 1x1 convs already are
pointwise). Taps for attention transfer: `layer2`, `layer3`, `layer4`.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.errors import require
from lightning_modules.layers.checkpointing import CheckpointableBlock
from lightning_modules.layers.substitutes import GroupedInit, init_convs, parse_substitute, substitute_conv

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class Bottleneck(CheckpointableBlock):
    """1x1 (in -> width) - 3x3 substitute (stride) - 1x1 (width -> 4 planes), BN-ReLU after each, plus the input
    or a strided 1x1 conv-BN projection of it."""

    expansion = 4

    def __init__(
        self, in_ch: int, planes: int, width: int, stride: int, conv: str = "Conv", checkpointed: bool = False
    ):
        super().__init__()
        out_ch = planes * self.expansion
        self.checkpointed = checkpointed
        self.conv1, self.bn1 = nn.Conv2d(in_ch, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = substitute_conv(conv, width, width, 3, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class WideResNetImageNet(nn.Module):
    """WRN-`depth`-`width` for ImageNet (torchvision's wide ResNets); every block's 3x3 conv from `conv`."""

    def __init__(
        self,
        depth: int = 50,
        width: int = 2,
        num_classes: int = 1000,
        conv: str = "Conv",
        checkpoint_blocks: bool = False,
        grouped_conv_init: GroupedInit = "original",
    ):
        """
        Args:
            depth: 50 or 101.
            width: the factor on the bottleneck's inner width (2: wide_resnet50_2; 1: ResNet-50).
            num_classes: outputs.
            conv: the blocks' 3x3 conv: `Conv` (the teacher) or a substitute such as `Shuffle_4`.
            checkpoint_blocks: recompute each block's activations in the backward pass (less memory).
            grouped_conv_init: `original` (torchvision's: every conv's fan-out counts all its C_out, so a
                substitute's depthwise conv starts with C times less variance than He init) or `per_group`
                (the fan-out within a group: He init's variance for grouped and depthwise convs too).
        """
        require("positive", width=width, num_classes=num_classes)
        super().__init__()
        if depth not in BLOCKS:
            raise ValueError(f"WRN for ImageNet has depth 50 or 101, got {depth}")
        parse_substitute(conv)
        self.depth, self.width, self.conv = depth, width, conv
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = 64
        for index, (blocks, planes) in enumerate(zip(BLOCKS[depth], (64, 128, 256, 512), strict=True), start=1):
            layer = []
            for i in range(blocks):
                stride = 2 if i == 0 and index > 1 else 1
                layer.append(Bottleneck(in_ch, planes, planes * width, stride, conv, checkpoint_blocks))
                in_ch = planes * Bottleneck.expansion
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        self.avgpool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(in_ch, num_classes)
        init_convs(self, grouped_conv_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))

    def extra_repr(self) -> str:
        return f"WRN-{self.depth}-{self.width} (ImageNet), conv={self.conv}"
