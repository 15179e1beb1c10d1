"""The sparse CNN of "How can we be so dense?": the Speech Commands nets and the MNIST CNN-2 nets as settings.

Two conv blocks (conv k x k, no padding -> [BN2d affine=False] -> max pool 2 -> activation), a hidden
linear block (Linear, dense or SparseWeights -> [BN1d affine=False] -> activation) and a linear output.
An activation is k-winners when its `percent_on` is set, ReLU when it is null. `kwinners_first`
swaps the order of pooling and activation (the study's own copy), `hidden_sparsity` makes the
hidden weights sparse (0: dense), so the nets the original study compared are overrides of one config.
The output is logits: the paper's LogSoftmax + NLL is the framework's cross-entropy.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from lightning_modules.errors import require
from lightning_modules.layers.kwinners import KWinners, KWinners2d
from lightning_modules.layers.sparse_weights import SparseWeights


def sparse_or_dense(layer: nn.Linear | nn.Conv2d, sparsity: float) -> nn.Module:
    return SparseWeights(layer, sparsity) if sparsity > 0 else layer


class SparseCNN(nn.Module):
    """conv blocks -> hidden -> output; the spec's GSC dense/sparse/super-sparse and MNIST CNN-2 nets."""

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (1, 32, 32),
        channels: tuple[int, ...] = (64, 64),
        kernel_size: int = 5,
        conv_percent_on: tuple[float | None, ...] = (0.095, 0.125),
        kwinners_first: bool = False,
        batch_norm: bool = True,
        hidden: int = 1000,
        hidden_percent_on: float | None = 0.1,
        hidden_sparsity: float = 0.6,
        output_sparsity: float = 0.0,
        dropout: float = 0.0,
        num_classes: int = 12,
        boost_strength: float = 1.5,
        boost_strength_factor: float = 0.9,
        k_inference_factor: float = 1.5,
        duty_cycle_period: int = 1000,
        local: bool = False,
        break_ties: bool = False,
    ):
        """
        Args:
            input_shape: one sample (C, H, W): 1x32x32 log-mel for Speech Commands, 1x28x28 for MNIST.
            channels: output channels of each conv block.
            kernel_size: conv kernel side (no padding, stride 1).
            conv_percent_on: per conv block, the fraction of units that win (null: ReLU instead of k-winners).
            kwinners_first: activation before max pooling (the study's own copy) instead of after (the paper).
            batch_norm: BatchNorm (affine=False) after each conv and after the hidden linear layer.
            hidden: units of the hidden linear layer.
            hidden_percent_on: fraction of hidden units that win (null: ReLU).
            hidden_sparsity: fraction of zero weights per hidden unit (0: dense; the paper's sparse net 0.6).
            output_sparsity: the same for the output layer (0: dense, as in the paper).
            dropout: dropout after the hidden activation (the paper's dense row with 0.5).
            num_classes: outputs.
            boost_strength: every k-winners layer's initial boost strength.
            boost_strength_factor: multiplied into the boost strength at the start of every epoch.
            k_inference_factor: k in evaluation is k * this.
            duty_cycle_period: samples the duty cycles average over.
            local: conv k-winners per position across channels instead of over the whole map.
            break_ties: exactly k winners (topk) instead of all units tied with the k-th.
        """
        require("positive", kernel_size=kernel_size, hidden=hidden, num_classes=num_classes, **dict(zip(
            [f"input_shape[{i}]" for i in range(3)], input_shape, strict=True)), **{f"channels[{i}]": c for i, c in
            enumerate(channels)}, k_inference_factor=k_inference_factor, duty_cycle_period=duty_cycle_period)  # fmt: skip
        require("probability", hidden_percent_on=hidden_percent_on, **{f"conv_percent_on[{i}]": p for i, p in
            enumerate(conv_percent_on)})  # fmt: skip
        require("fraction", hidden_sparsity=hidden_sparsity, output_sparsity=output_sparsity, dropout=dropout)
        require("non_negative", boost_strength=boost_strength, boost_strength_factor=boost_strength_factor)
        super().__init__()
        if len(conv_percent_on) != len(channels):
            raise ValueError(
                f"conv_percent_on needs one entry per conv block: {len(channels)}, got {len(conv_percent_on)}"
            )
        kw = dict(
            k_inference_factor=k_inference_factor,
            boost_strength=boost_strength,
            boost_strength_factor=boost_strength_factor,
            duty_cycle_period=duty_cycle_period,
            break_ties=break_ties,
        )
        c, h, w = input_shape
        blocks = []
        self.map_shapes: dict[str, tuple[int, int, int]] = {}  # the map each conv k-winners sees
        for i, (out, percent_on) in enumerate(zip(channels, conv_percent_on, strict=True), 1):
            conv_hw = (h - kernel_size + 1, w - kernel_size + 1)
            h, w = conv_hw[0] // 2, conv_hw[1] // 2
            self.map_shapes[f"features.block{i}.act"] = (out, *conv_hw) if kwinners_first else (out, h, w)
            if h < 1 or w < 1:
                raise ValueError(
                    f"input {input_shape} is too small for {len(channels)} conv blocks of {kernel_size}x{kernel_size}"
                )
            act = nn.ReLU() if percent_on is None else KWinners2d(out, percent_on, local=local, **kw)
            parts = [("conv", nn.Conv2d(c, out, kernel_size))]
            if batch_norm:
                parts.append(("norm", nn.BatchNorm2d(out, affine=False)))
            pool = ("pool", nn.MaxPool2d(2))
            parts += [("act", act), pool] if kwinners_first else [pool, ("act", act)]
            blocks.append((f"block{i}", nn.Sequential(OrderedDict(parts))))
            c = out
        self.features = nn.Sequential(OrderedDict(blocks))
        flat = c * h * w
        parts = [("linear", sparse_or_dense(nn.Linear(flat, hidden), hidden_sparsity))]
        if batch_norm:
            parts.append(("norm", nn.BatchNorm1d(hidden, affine=False)))
        parts.append(("act", nn.ReLU() if hidden_percent_on is None else KWinners(hidden, hidden_percent_on, **kw)))
        if dropout:
            parts.append(("dropout", nn.Dropout(dropout)))
        self.hidden = nn.Sequential(OrderedDict(parts))
        self.output = sparse_or_dense(nn.Linear(hidden, num_classes), output_sparsity)
        self.flat_features = flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(self.features(x).flatten(1)))

    def winners(self) -> dict[str, tuple[int, int]]:
        """Per k-winners layer: (training k, competing units per sample), as the spec's tables give them."""
        result = {}
        for name, module in self.named_modules():
            if isinstance(module, KWinners):
                result[name] = (module.k, module.n)
            elif isinstance(module, KWinners2d):
                units = self.map_shapes[name][0] if module.local else math.prod(self.map_shapes[name])
                result[name] = (module.ks(units)[0], units)
        return result
