"""Cheap substitutes for a k x k convolution (research line 4), chosen by a config string.

`substitute_conv("Shuffle_4", in_ch, out_ch, kernel_size=3, stride=1)` builds the module. The name
is the kind and, after `_`, its hyperparameter: `Conv`, `Sep`, `Generic_0.25`, `Shuffle_4`,
`SepHashed_0.1`, `ACDC_12`, `TensorTrain_0.25`, `Tucker_0.25`, `CP_0.1`. A depthwise part is added
only where the kernel is spatial (k > 1): a 1x1 conv has nothing to separate (the original once
added a pointless grouped conv there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import takewhile
from typing import Literal

from torch import nn

from lightning_modules.layers.acdc import ACDC
from lightning_modules.layers.factorized import CPPointwise, TensorTrainPointwise, TuckerPointwise
from lightning_modules.layers.hashed import HashedPointwise


def _pointwise(in_ch: int, out_ch: int, groups: int = 1, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride, bias=False, groups=groups)


def _spatial(channels: int, kernel_size: int, stride: int, padding: int) -> tuple[list[nn.Module], int]:
    """The depthwise k x k part (none for k = 1) and the stride left for the first pointwise conv."""
    if kernel_size == 1:
        return [], stride
    return [nn.Conv2d(channels, channels, kernel_size, stride, padding, groups=channels, bias=False)], 1


class Generic(nn.Sequential):
    """`Generic_r`: depthwise k x k (k > 1) -> 1x1 (in -> rank) -> 1x1 (rank -> out), rank = int(r * max(in, out))."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        r: float = 0.25,
    ):
        padding = kernel_size // 2 if padding is None else padding
        rank = max(1, int(r * max(in_ch, out_ch)))
        spatial, stride = _spatial(in_ch, kernel_size, stride, padding)
        super().__init__(*spatial, _pointwise(in_ch, rank, stride=stride), _pointwise(rank, out_ch))
        self.rank = rank


class ChannelShuffle(nn.Module):
    """Interleave the channels of `groups` groups (ShuffleNet), so the next grouped conv mixes them."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class Shuffle(nn.Sequential):
    """`Shuffle_g`: grouped 1x1 (in -> out/4, g groups) -> channel shuffle -> depthwise k x k (k > 1)
    -> grouped 1x1 (-> out, g groups), one group count for both grouped convs as in the original. Where
    g does not divide in, out/4 and out (WRN-28-10's 16-channel stem at g = 32), both use the largest
    count below g that divides all three."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, padding: int | None = None, g: int = 4
    ):
        if g < 1:
            raise ValueError(f"Shuffle needs g >= 1 groups, got {g}")
        padding = kernel_size // 2 if padding is None else padding
        mid = max(1, out_ch // 4)
        groups = _common_groups(g, in_ch, mid, out_ch)
        spatial, stride = _spatial(mid, kernel_size, stride, padding)
        super().__init__(
            _pointwise(in_ch, mid, groups, stride), ChannelShuffle(groups), *spatial, _pointwise(mid, out_ch, groups)
        )
        self.groups = groups


def _common_groups(g: int, *channels: int) -> int:
    """The largest group count <= g that divides every one of `channels`."""
    while any(c % g for c in channels):
        g -= 1
    return g


def full_conv(in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, padding: int | None = None) -> nn.Conv2d:
    """`Conv`: the full convolution, no bias (batch norm follows)."""
    padding = kernel_size // 2 if padding is None else padding
    return nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, bias=False)


class DepthwiseThen(nn.Sequential):
    """Depthwise k x k (k > 1), then a cheap 1x1 map: `pointwise(in, out, stride=..., **options)`."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        *,
        pointwise: Callable[..., nn.Module],
        **options: float,
    ):
        padding = kernel_size // 2 if padding is None else padding
        spatial, stride = _spatial(in_ch, kernel_size, stride, padding)
        super().__init__(*spatial, pointwise(in_ch, out_ch, stride=stride, **options))


@dataclass(frozen=True)
class Kind:
    """A substitute kind: how to build it and, for budgets, its hyperparameter's name and search range."""

    build: Callable[..., nn.Module]
    param: str | None = None
    low: float = 1e-4
    high: float = 1.0
    integer: bool = False
    grows: bool = True  # more of the hyperparameter, more parameters


SUBSTITUTES = {
    "Conv": Kind(full_conv),
    "Sep": Kind(partial(DepthwiseThen, pointwise=_pointwise)),  # depthwise k x k (k > 1), then a 1x1
    "Generic": Kind(Generic, "r"),
    "Shuffle": Kind(Shuffle, "g", 1, 256, integer=True, grows=False),
    "SepHashed": Kind(partial(DepthwiseThen, pointwise=HashedPointwise), "s", 1e-5),
    "ACDC": Kind(partial(DepthwiseThen, pointwise=ACDC), "n", 1, 64, integer=True),
    "TensorTrain": Kind(partial(DepthwiseThen, pointwise=TensorTrainPointwise), "r"),
    "Tucker": Kind(partial(DepthwiseThen, pointwise=TuckerPointwise), "r"),
    "CP": Kind(partial(DepthwiseThen, pointwise=CPPointwise), "r"),
}


def fit_budget(kind: str, params_of: Callable[[str], int], budget: float) -> tuple[str, int]:
    """The substitute name (`kind` with its hyperparameter) whose net has the most parameters at or under
    `budget`, by a scalar search on `params_of(name)`: bisection for a real hyperparameter (r, s), a scan
    for an integer one (Shuffle's g, ACDC's n)."""
    kind = kind.partition("_")[0]
    if kind not in SUBSTITUTES or SUBSTITUTES[kind].param is None:
        fitting = sorted(k for k, spec in SUBSTITUTES.items() if spec.param is not None)
        raise ValueError(f"a parameter budget needs a substitute with a hyperparameter ({fitting}), got {kind!r}")
    spec = SUBSTITUTES[kind]

    def fits(value: float) -> bool:
        return params_of(f"{kind}_{value:.6g}") <= budget

    values = range(int(spec.low), int(spec.high) + 1)
    if spec.integer and spec.grows:  # ACDC: the most factors that fit
        fitting = list(takewhile(fits, values))
        best = fitting[-1] if fitting else None
    elif spec.integer:  # Shuffle: the fewest groups that fit
        best = next((v for v in values if fits(v)), None)
    else:  # bisection on r or s
        best = None
        if fits(spec.low):
            low, high = spec.low, spec.high
            for _ in range(40):
                mid = (low + high) / 2
                low, high = (mid, high) if fits(mid) else (low, mid)
            best = low
    if best is None:
        raise ValueError(f"budget {budget:.4g} is below the smallest {kind} net this search reaches")
    name = f"{kind}_{best:.6g}"
    return name, params_of(name)


def parse_substitute(name: str) -> tuple[str, float | None]:
    """`"Shuffle_4"` -> ("Shuffle", 4.0); `"Conv"` -> ("Conv", None); a clear error for anything else."""
    kind, _, value = name.partition("_")
    if kind not in SUBSTITUTES:
        raise ValueError(
            f"unknown conv substitute {name!r}: one of {sorted(SUBSTITUTES)} (with _<value> where it takes one)"
        )
    needs = SUBSTITUTES[kind].param
    if needs is None and value:
        raise ValueError(f"{kind} takes no hyperparameter, got {name!r}")
    if needs is not None:
        if not value:
            raise ValueError(f"{kind} needs its {needs}: e.g. {kind}_4")
        try:
            return kind, float(value)
        except ValueError as e:
            raise ValueError(f"{name!r}: {value!r} is not a number") from e
    return kind, None


def substitute_conv(
    name: str, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, padding: int | None = None
) -> nn.Module:
    """The conv substitute `name` (e.g. `Shuffle_4`) for an in_ch -> out_ch k x k convolution; its
    `full_params` is the weight count of the full conv it replaces (for compression-scaled weight decay)."""
    kind, value = parse_substitute(name)
    spec = SUBSTITUTES[kind]
    options = {} if spec.param is None else {spec.param: int(value) if spec.integer else value}
    module = spec.build(in_ch, out_ch, kernel_size, stride, padding, **options)
    module.full_params = in_ch * out_ch * kernel_size * kernel_size
    return module


GroupedInit = Literal["original", "per_group"]


def init_convs(net: nn.Module, grouped: GroupedInit = "original") -> None:
    """He-normal init (ReLU gain) of every Conv2d of `net` from its fan-out, std = sqrt(2 / n).

    `original`: n = k*k*C_out whatever the conv's groups, as the original WRN code (and torch's `fan_out`)
    computes it: a depthwise k x k conv over C channels then starts with C times less variance than He
    init, a grouped one with g times less. `per_group`: n = k*k*C_out / groups, the fan-out within a
    group, which gives grouped and depthwise convs He init's variance too.
    """
    if grouped not in ("original", "per_group"):
        raise ValueError(f"grouped conv init must be 'original' or 'per_group', got {grouped!r}")
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.out_channels * math.prod(module.kernel_size)
            if grouped == "per_group":
                fan_out //= module.groups
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))


def compression_ratios(net: nn.Module) -> dict[str, float]:
    """Per substitute module of `net` (by name): its parameter count over that of the full conv it replaces."""
    return {
        name: sum(p.numel() for p in module.parameters()) / module.full_params
        for name, module in net.named_modules()
        if hasattr(module, "full_params")
    }
