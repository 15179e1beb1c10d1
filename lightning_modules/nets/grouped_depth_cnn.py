"""Several DepthCNNs of one architecture as one net, so that the seeds of a search probe train together.

Member s owns the s-th block of every layer's channels: each conv is grouped by member (groups = members), batch
norm is per channel and so per member, member s reads its own batch as its own input channels, and each member has
its own head. No value crosses from one member to another, forward or backward, so under an elementwise optimizer
(SGD, Adam, ...) a member trains as its own net would, up to float rounding. The small convs of the deep variants
become wider ones; what that saves on a CPU (little) is in benchmarks/README.md (`stacked_trials.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.nets.depth_cnn import DepthBlock, DepthCNN


class GroupedLinear(nn.Module):
    """One linear layer per member: `weight` (members, out, in) and `bias` (members, out), each member's laid out as
    nn.Linear's; maps (B, members, in) to (B, members, out)."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bsi,soi->bso", x, self.weight) + self.bias


class GroupedDepthCNN(nn.Module):
    """`nets` (DepthCNNs of the same settings but their depth's seed) as one net: input (B, members x C, H, W),
    member s's images in channels [s C, (s + 1) C); output (B, members, classes), member s's logits at [:, s]."""

    def __init__(self, nets: list[DepthCNN]):
        super().__init__()
        settings = [net.settings for net in nets]
        if not nets or any(s != settings[0] for s in settings):
            raise ValueError("a grouped net needs one or more DepthCNNs of the same settings")
        self.settings, self.members = settings[0], len(nets)
        s = self.members
        layers: list[nn.Module] = []
        for parts in zip(*(net.features for net in nets), strict=True):
            first = parts[0]
            if not isinstance(first, DepthBlock):  # a pool: per channel already
                layers.append(first)
                continue
            conv = first.conv
            block = DepthBlock(conv.in_channels * s, conv.out_channels * s, self.settings["activation"],
                               self.settings["batch_norm"], first.residual)  # fmt: skip
            block.conv = nn.Conv2d(conv.in_channels * s, conv.out_channels * s, 3, padding=1, groups=s)
            _stack_into(block.conv, [p.conv for p in parts])
            if isinstance(first.norm, nn.BatchNorm2d):
                _stack_into(block.norm, [p.norm for p in parts])
            layers.append(block)
        self.features = nn.Sequential(*layers)
        self.head = GroupedLinear([net.head for net in nets])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features(x)  # (B, S*C, h, w)
        return self.head(maps.reshape(len(x), self.members, -1))  # member s's C*h*w, flattened as its own net does

    def member(self, s: int) -> DepthCNN:
        """Member s as a DepthCNN of its own: its parameters and batch-norm statistics (the global random stream is
        left as it was: building the net draws an init that is then overwritten)."""
        with torch.random.fork_rng(devices=[]):
            net = DepthCNN(**self.settings).to(self.head.weight.device, self.head.weight.dtype)
        for own, grouped in zip(net.features, self.features, strict=True):
            if isinstance(own, DepthBlock):
                _member_of(own.conv, grouped.conv, s, self.members)
                if isinstance(own.norm, nn.BatchNorm2d):
                    _member_of(own.norm, grouped.norm, s, self.members)
        with torch.no_grad():
            net.head.weight.copy_(self.head.weight[s])
            net.head.bias.copy_(self.head.bias[s])
        return net


def _stack_into(grouped: nn.Module, parts: list[nn.Module]) -> None:
    """Each of `grouped`'s per-channel tensors (parameters, running statistics) as the members' concatenated."""
    with torch.no_grad():
        for name, tensor in [*grouped.named_parameters(recurse=False), *grouped.named_buffers(recurse=False)]:
            if tensor.dim():  # not num_batches_tracked, alike in every member
                tensor.copy_(torch.cat([getattr(p, name) for p in parts]))


def _member_of(own: nn.Module, grouped: nn.Module, s: int, members: int) -> None:
    """Member s's block of `grouped`'s per-channel tensors, into its own layer `own`."""
    with torch.no_grad():
        for name, tensor in [*own.named_parameters(recurse=False), *own.named_buffers(recurse=False)]:
            source = getattr(grouped, name)
            if tensor.dim():
                tensor.copy_(source.chunk(members)[s])
            else:
                tensor.copy_(source)
