"""The depth-series net: the variants' shapes, parameter counts, init and residual wiring."""

import math

import pytest
import torch
import yaml

from lightning_modules.nets import DepthBlock, DepthCNN
from tests.conftest import CONFIGS

VARIANTS = sorted(p.stem for p in (CONFIGS / "depth").glob("*.yaml") if p.stem != "search_all")


def spec_params(k: int, batch_norm: bool) -> int:
    """The spec's architecture counted by hand: 3x3 convs with bias (+ BN scale/shift), then 144 -> 10."""
    total, c_in = 0, 1
    for width in (4, 8, 16):
        for i in range(k // 3):
            c = c_in if i == 0 else width
            total += 9 * c * width + width + (2 * width if batch_norm else 0)
        c_in = width
    return total + 144 * 10 + 10


def variant_net(name: str, depth: int) -> DepthCNN:
    settings = yaml.safe_load((CONFIGS / "depth" / f"{name}.yaml").read_text())["model"]["init_args"]["net"][
        "init_args"
    ]
    return DepthCNN(**{**settings, "depth": depth})


def test_the_spec_s_seven_variants_and_the_delta_orthogonal_one_have_configs():
    from lightning_modules.studies.search import ORIGINAL_DEPTHS

    assert len(ORIGINAL_DEPTHS) == 7 and sorted([*ORIGINAL_DEPTHS, "tanh_delta_orthogonal"]) == VARIANTS


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("k", [3, 6, 12, 30])
def test_variant_shape_and_parameter_count(name, k):
    net = variant_net(name, k)
    out = net(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    assert sum(p.numel() for p in net.parameters()) == spec_params(k, net.settings["batch_norm"])
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == k


def test_pooling_takes_28_to_3():
    net = DepthCNN(depth=3)
    x = net.features(torch.zeros(1, 1, 28, 28))
    assert x.shape == (1, 16, 3, 3) and net.head.in_features == 144


@pytest.mark.parametrize(
    "init_std,expected",
    [
        (0.05, lambda c_in, c_out: 0.05),
        ("fan_in", lambda c_in, c_out: math.sqrt(1 / (9 * c_in))),
        ("fan_out", lambda c_in, c_out: math.sqrt(1 / (9 * c_out))),
    ],
)
def test_conv_init_statistics(init_std, expected):
    torch.manual_seed(0)
    net = DepthCNN(depth=30, widths=(32, 64, 64), init_std=init_std)  # wide, so the sample std is tight
    for conv in (m for m in net.modules() if isinstance(m, torch.nn.Conv2d)):
        if conv.weight.numel() < 1000:
            continue
        assert conv.weight.std().item() == pytest.approx(expected(conv.in_channels, conv.out_channels), rel=0.1)
        assert conv.weight.mean().abs().item() < 0.1 * expected(conv.in_channels, conv.out_channels)
        assert torch.all(conv.bias == 0)


def test_bad_init_and_depth_are_refused():
    with pytest.raises(ValueError, match="multiple of 3"):
        DepthCNN(depth=10)
    with pytest.raises(ValueError, match="init_std"):
        DepthCNN(depth=3, init_std="he")


@pytest.mark.parametrize("batch_norm", [True, False])
def test_residual_skip_is_on_every_block_but_the_first_of_a_stage(batch_norm):
    torch.manual_seed(0)
    net = DepthCNN(depth=12, activation="elu", batch_norm=batch_norm, residual=True).eval()
    blocks = [m for m in net.features if isinstance(m, DepthBlock)]
    x = torch.randn(2, 1, 28, 28)
    for index, block in enumerate(blocks):
        first_of_stage = index % 4 == 0
        branch = block.act(block.norm(block.conv(x)))
        out = block(x)
        # the first block of a stage changes channels: no skip; every other block adds its input
        torch.testing.assert_close(out, branch if first_of_stage else branch + x)
        x = out
        if index % 4 == 3:
            x = torch.nn.functional.avg_pool2d(x, 2)
    assert sum(b.residual for b in blocks) == 12 - 3


def test_at_depth_keeps_settings_and_reinitialises():
    net = DepthCNN(depth=6, activation="elu", batch_norm=True, residual=True, init_std="fan_out")
    deeper = net.at_depth(15)
    assert deeper.settings == {**net.settings, "depth": 15}
    assert sum(isinstance(m, torch.nn.Conv2d) for m in deeper.modules()) == 15
