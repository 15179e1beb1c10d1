"""Cheap substitutes for a k x k convolution (research line 4), chosen by a config string.

`substitute_conv("Shuffle_4", in_ch, out_ch, kernel_size=3, stride=1)` builds the module. The name
is the kind and, after `_`, its hyperparameter: `Conv`, `Sep`, `Generic_0.25`, `Shuffle_4`. A depthwise
part is added only where the kernel is spatial (k > 1): a 1x1 conv has nothing to separate (the
original once added a pointless grouped conv there).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def _pointwise(in_ch: int, out_ch: int, groups: int = 1, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride, bias=False, groups=groups)


def _spatial(channels: int, kernel_size: int, stride: int, padding: int) -> tuple[list[nn.Module], int]:
    """The depthwise k x k part (none for k = 1) and the stride left for the first pointwise conv."""
    if kernel_size == 1:
        return [], stride
    return [nn.Conv2d(channels, channels, kernel_size, stride, padding, groups=channels, bias=False)], 1


class Separable(nn.Sequential):
    """`Sep`: depthwise k x k (only when k > 1), then pointwise 1x1 (in -> out)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, padding: int | None = None):
        padding = kernel_size // 2 if padding is None else padding
        spatial, stride = _spatial(in_ch, kernel_size, stride, padding)
        super().__init__(*spatial, _pointwise(in_ch, out_ch, stride=stride))


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
    -> grouped 1x1 (-> out, g groups). Group counts fall back to the largest divisor of both sides."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, padding: int | None = None, g: int = 4
    ):
        if g < 1:
            raise ValueError(f"Shuffle needs g >= 1 groups, got {g}")
        padding = kernel_size // 2 if padding is None else padding
        mid = max(1, out_ch // 4)
        g1, g2 = _common_groups(g, in_ch, mid), _common_groups(g, mid, out_ch)
        spatial, stride = _spatial(mid, kernel_size, stride, padding)
        super().__init__(_pointwise(in_ch, mid, g1, stride), ChannelShuffle(g1), *spatial, _pointwise(mid, out_ch, g2))


def _common_groups(g: int, a: int, b: int) -> int:
    while a % g or b % g:
        g -= 1
    return g


def full_conv(in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, padding: int | None = None) -> nn.Conv2d:
    """`Conv`: the full convolution, no bias (batch norm follows)."""
    padding = kernel_size // 2 if padding is None else padding
    return nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, bias=False)


SUBSTITUTES = {
    "Conv": (full_conv, None),
    "Sep": (Separable, None),
    "Generic": (Generic, "r"),
    "Shuffle": (Shuffle, "g"),
}


def fit_budget(kind: str, params_of: Callable[[str], int], budget: float) -> tuple[str, int]:
    """The substitute name (`kind` with its hyperparameter) whose net has the most parameters at or under
    `budget`, by a scalar search on `params_of(name)`: bisection on Generic's r, a scan of Shuffle's g."""
    kind = kind.partition("_")[0]
    if kind not in SUBSTITUTES or SUBSTITUTES[kind][1] is None:
        fitting = sorted(k for k, (_, p) in SUBSTITUTES.items() if p is not None)
        raise ValueError(f"a parameter budget needs a substitute with a hyperparameter ({fitting}), got {kind!r}")
    if kind == "Generic":
        low, high = 1e-4, 1.0
        if params_of(f"Generic_{low}") > budget:
            raise ValueError(f"budget {budget:.4g} is below the smallest Generic net ({params_of(f'Generic_{low}'):,})")
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if params_of(f"Generic_{mid:.6g}") <= budget else (low, mid)
        name = f"Generic_{low:.6g}"
    else:  # more groups, fewer parameters: the smallest g that fits
        name = next((f"Shuffle_{g}" for g in range(1, 257) if params_of(f"Shuffle_{g}") <= budget), None)
        if name is None:
            raise ValueError(f"budget {budget:.4g} is below the smallest Shuffle net ({params_of('Shuffle_256'):,})")
    return name, params_of(name)


def parse_substitute(name: str) -> tuple[str, float | None]:
    """`"Shuffle_4"` -> ("Shuffle", 4.0); `"Conv"` -> ("Conv", None); a clear error for anything else."""
    kind, _, value = name.partition("_")
    if kind not in SUBSTITUTES:
        raise ValueError(
            f"unknown conv substitute {name!r}: one of {sorted(SUBSTITUTES)} (with _<value> where it takes one)"
        )
    needs = SUBSTITUTES[kind][1]
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
    build, param = SUBSTITUTES[kind]
    kwargs = {} if param is None else {param: int(value) if param == "g" else value}
    module = build(in_ch, out_ch, kernel_size, stride, padding, **kwargs)
    module.full_params = in_ch * out_ch * kernel_size * kernel_size
    return module


def compression_ratios(net: nn.Module) -> dict[str, float]:
    """Per substitute module of `net` (by name): its parameter count over that of the full conv it replaces."""
    return {
        name: sum(p.numel() for p in module.parameters()) / module.full_params
        for name, module in net.named_modules()
        if hasattr(module, "full_params")
    }
