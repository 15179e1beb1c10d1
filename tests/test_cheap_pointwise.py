"""The pointwise maps of the cheap substitutes: hashed sharing, ACDC, factorised 1x1 convs; no import side effects."""

import subprocess
import sys

import numpy as np
import pytest
import scipy.fft
import torch
import torch.nn.functional as F

from lightning_modules.counting import count
from lightning_modules.layers.acdc import ACDC, dct, idct, riffle
from lightning_modules.layers.factorized import CPPointwise, TensorTrainPointwise, TuckerPointwise, split_modes
from lightning_modules.layers.hashed import HashedPointwise
from tests.conftest import ROOT


@pytest.mark.parametrize("n", [1, 2, 5, 16, 17, 160])
def test_dct_and_its_inverse_match_scipys_orthonormal_transforms(n):
    x = torch.randn(3, n, dtype=torch.float64)
    np.testing.assert_allclose(dct(x).numpy(), scipy.fft.dct(x.numpy(), norm="ortho"), atol=1e-12)
    np.testing.assert_allclose(idct(x).numpy(), scipy.fft.idct(x.numpy(), norm="ortho"), atol=1e-12)


def test_riffle_interleaves_the_two_halves():
    assert riffle(6).tolist() == [0, 3, 1, 4, 2, 5] and riffle(5).tolist() == [0, 3, 1, 4, 2]


def test_acdc_with_unit_diagonals_is_orthogonal_and_starts_near_them():
    layer = ACDC(64, 64, n=12)
    assert abs(layer.a.mean().item() - 1) < 0.01 and 0.005 < layer.a.std().item() < 0.02  # N(1, 0.01)
    layer = ACDC(64, 64, n=5)  # (not 12: the perfect shuffle of 64 repeats after 6, so 12 unit factors are I)
    with torch.no_grad():
        layer.a.fill_(1.0), layer.d.fill_(1.0)
    x = torch.randn(2, 64, 3, 3)
    out = layer(x)
    torch.testing.assert_close(out.norm(dim=1), x.norm(dim=1), rtol=1e-4, atol=1e-5)  # DCTs and shuffles only
    assert not torch.allclose(out, x, atol=1e-3)  # but the shuffle between them mixes channels
    wider = ACDC(16, 64, n=2)
    assert wider.channels == 64 and wider(torch.randn(1, 16, 2, 2)).shape == (1, 64, 2, 2)


def test_acdc_runs_the_specs_factor_order_with_its_dense_transforms():
    torch.manual_seed(0)
    layer = ACDC(40, 64, n=3)
    x = torch.randn(2, 40, 5, 5)
    y = F.pad(x.permute(0, 2, 3, 1), (0, 24))  # by the spec, with the FFT transforms: A, DCT, D, riffle, iDCT
    for a, d in zip(layer.a, layer.d, strict=True):
        y = idct((dct(y * a) * d)[..., riffle(64)])
    torch.testing.assert_close(layer(x), y.permute(0, 3, 1, 2), rtol=1e-4, atol=1e-5)
    assert "4N + 5N log2 N" in count(layer, (40, 5, 5)).summary()  # the count's convention is stated


def test_hashed_weights_share_buckets_with_signs_and_sum_their_gradients():
    layer = HashedPointwise(40, 30, s=0.1)
    assert layer.weight.numel() == 120
    again = HashedPointwise(40, 30, s=0.1)
    assert torch.equal(layer.bucket, again.bucket) and torch.equal(layer.sign, again.sign)  # from shapes alone
    assert set(layer.sign.unique().tolist()) == {-1.0, 1.0} and layer.bucket.unique().numel() == 120
    dense = layer.virtual_weight()
    assert torch.equal(dense.abs().flatten().unique().sort().values, layer.weight.abs().unique().sort().values)
    x = torch.randn(2, 40, 4, 4)
    torch.testing.assert_close(layer(x), F.conv2d(x, dense.detach()))
    grad_out = torch.randn(2, 30, 4, 4)
    layer(x).mul(grad_out).sum().backward()
    dense_grad = torch.einsum("nohw,nihw->oi", grad_out, x)
    expected = torch.zeros(120).index_add_(0, layer.bucket.flatten(), (dense_grad * layer.sign).flatten())
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-4, atol=1e-5)


def dense_weight(layer) -> torch.Tensor:
    """The (out, in) weight a factorised layer stands for, from its factors by the textbook formula."""
    a, b = layer.a, layer.b
    if isinstance(layer, TensorTrainPointwise):
        r1, r2 = layer.ranks
        w = torch.einsum("op,piq,jq->oij", layer.g1, layer.g2.view(r1, a, r2), layer.g3)
    elif isinstance(layer, TuckerPointwise):
        r1, r2, r3 = layer.ranks
        w = torch.einsum("pqs,op,iq,js->oij", layer.core.view(r1, r2, r3), layer.u1, layer.u2, layer.u3)
    else:
        w = torch.einsum("ok,ik,jk->oij", layer.u1, layer.u2, layer.u3)
    return w.reshape(layer.out_ch, a * b)


@pytest.mark.parametrize("kind", [TensorTrainPointwise, TuckerPointwise, CPPointwise])
def test_factorised_layers_apply_the_weight_their_factors_stand_for(kind):
    torch.manual_seed(0)
    layer = kind(48, 24, r=0.5, stride=2)
    x = torch.randn(2, 48, 6, 6)
    expected = F.conv2d(x, dense_weight(layer)[:, :, None, None], stride=2)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
    # initialised so the implied weight has the full conv's variance, 2 / out (Kaiming, fan out)
    big = kind(640, 640, r=0.25)
    assert dense_weight(big).var().item() == pytest.approx(2 / 640, rel=0.25)


def test_modes_split_input_channels_evenly():
    assert split_modes(640) == (20, 32) and split_modes(16) == (4, 4) and split_modes(7) == (1, 7)


@pytest.mark.subprocess
def test_importing_the_project_changes_no_global_torch_state():
    probe = """
import importlib, pkgutil, torch
def state():
    return (torch.get_default_dtype(), str(torch.get_default_device()), torch.is_grad_enabled(),
            torch.are_deterministic_algorithms_enabled(), torch.is_anomaly_enabled(), torch.get_num_threads(),
            torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark, torch.initial_seed())
before = state()
for package in ("lightning_modules", "datamodules", "callbacks"):
    importlib.import_module(package)
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        importlib.import_module(info.name)
assert state() == before, (before, state())
print("unchanged", len(before))
"""
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "unchanged" in result.stdout, result.stderr[-2000:]
