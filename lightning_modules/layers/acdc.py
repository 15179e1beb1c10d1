"""ACDC factors (Moczulski et al. 2016), the pointwise part of `ACDC_n`.

One factor on N channels: x -> iDCT(riffle(D * DCT(A * x))), with A, D learned diagonals
initialised N(1, 0.01) (standard deviation 0.01: a stack starts near a fixed orthogonal map), DCT the
orthonormal DCT-II and riffle the perfect shuffle of the two halves of the channels. A stack of
n factors maps in -> out channels on N = max(in, out) channels: zero-padded in, cut to out.
The count is the spec's 4N + 5N log2 N per factor and position, the cost of applying the factors
with fast DCTs. This code computes the same map another way: it multiplies the n factors (each
diag(A) DCT diag(D) riffle iDCT, as N x N matrices) into one matrix per step and applies that as a
1x1 conv, whose cost does not grow with n per position. Applying the factors one by one to every
position (by FFT or matmul) is memory-bound, 12 passes of 4 elementwise ops over the activations,
and made a WRN-16-2 training step 17x (matmuls) to 37x (FFTs) slower on CPU. `count` says which convention it prints.
`dct` and `idct` (by FFT) build the matrices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _dct_scale(n: int, device, dtype) -> torch.Tensor:
    scale = torch.full((n,), math.sqrt(1 / (2 * n)), device=device, dtype=dtype)
    scale[0] = math.sqrt(1 / (4 * n))
    return scale


def dct(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II over the last dimension (scipy's `dct(x, norm="ortho")`), by one FFT (Makhoul 1980)."""
    n = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    k = torch.arange(n, device=x.device, dtype=x.dtype)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))
    return 2 * (torch.fft.fft(v) * twiddle).real * _dct_scale(n, x.device, x.dtype)


def idct(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `dct` (orthonormal DCT-III), by one inverse FFT."""
    n = x.shape[-1]
    u = x / (2 * _dct_scale(n, x.device, x.dtype))
    k = torch.arange(n, device=x.device, dtype=x.dtype)
    mirrored = torch.cat([torch.zeros_like(u[..., :1]), u[..., 1:].flip(-1)], dim=-1)  # u[N - k], u[N] = 0
    spectrum = torch.complex(u, -mirrored) * torch.polar(torch.ones_like(k), math.pi * k / (2 * n))
    v = torch.fft.ifft(spectrum).real
    half = (n + 1) // 2
    out = torch.empty_like(v)
    out[..., ::2], out[..., 1::2] = v[..., :half], v[..., half:].flip(-1)
    return out


def riffle(n: int) -> torch.Tensor:
    """The perfect shuffle of n positions: the first and second halves interleaved (0, h, 1, h + 1, ...)."""
    half = (n + 1) // 2
    order = [i // 2 if i % 2 == 0 else half + i // 2 for i in range(n)]
    return torch.tensor(order)


class ACDC(nn.Module):
    """A stack of n ACDC factors as a 1x1 map (in -> out channels, optional stride)."""

    count_note = (
        "ACDC: mult-adds are the spec's 4N + 5N log2 N per factor and position (fast DCTs); "
        "this code multiplies the factors into one N x N matrix per step and applies it as a 1x1 conv"
    )

    def __init__(self, in_ch: int, out_ch: int, n: int = 12, stride: int = 1):
        super().__init__()
        if n < 1:
            raise ValueError(f"ACDC needs n >= 1 factors, got {n}")
        self.in_ch, self.out_ch, self.n, self.stride = in_ch, out_ch, n, stride
        self.channels = max(in_ch, out_ch)
        self.a = nn.Parameter(torch.empty(n, self.channels).normal_(1.0, 0.01))
        self.d = nn.Parameter(torch.empty(n, self.channels).normal_(1.0, 0.01))
        eye = torch.eye(self.channels, dtype=torch.float64)
        # x @ transform = dct(x); z @ inverse = idct(z[..., riffle]): built once, in double precision
        self.register_buffer("transform", dct(eye).float(), persistent=False)
        self.register_buffer("inverse", idct(eye[:, riffle(self.channels)]).float(), persistent=False)

    def matrix(self) -> torch.Tensor:
        """The N x N map of the whole stack, x -> x @ matrix (x a row of N channels)."""
        product = None
        for a, d in zip(self.a, self.d, strict=True):
            factor = (a[:, None] * self.transform * d) @ self.inverse  # diag(A) DCT diag(D) riffle iDCT
            product = factor if product is None else product @ factor
        return product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # zero-padding in to N channels and cutting N to out: the in x out corner of the matrix
        weight = self.matrix()[: self.in_ch, : self.out_ch].T
        return F.conv2d(x, weight[:, :, None, None].contiguous(), stride=self.stride)

    def mult_adds(self, output: torch.Tensor) -> int:
        """Per sample: n (4N + 5N log2 N) per output position, the spec's count for a fast DCT."""
        n = self.channels
        positions = output[0].numel() // self.out_ch
        return positions * self.n * round(4 * n + 5 * n * math.log2(n))

    def extra_repr(self) -> str:
        return f"{self.in_ch}, {self.out_ch}, n={self.n}, channels={self.channels}, stride={self.stride}"
