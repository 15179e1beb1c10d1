"""Conv substitutes and WRN-d-k: shapes, gradients, counts against the spec and an independent counter."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_modules.counting import count
from lightning_modules.layers import substitute_conv
from lightning_modules.layers.hashed import HashedPointwise
from lightning_modules.layers.substitutes import Shuffle, init_convs, parse_substitute
from lightning_modules.nets import WideBlock, WideResNet
from tests.conftest import ROOT

NAMES = ["Conv", "Sep", "Generic_0.25", "Shuffle_4", "Shuffle_8"]
CHEAP_POINTWISE = ["SepHashed_0.1", "TensorTrain_0.5", "Tucker_0.5", "CP_0.25"]  # counted by torch's counter too


@pytest.mark.parametrize("name", NAMES + CHEAP_POINTWISE)
@pytest.mark.parametrize("kernel_size, stride", [(3, 1), (3, 2), (1, 1), (1, 2)])
def test_substitute_shapes_gradients_and_mult_adds(name, kernel_size, stride):
    torch.manual_seed(0)
    layer = substitute_conv(name, 32, 64, kernel_size, stride)
    x = torch.randn(2, 32, 8, 8)
    reference = nn.Conv2d(32, 64, kernel_size, stride, kernel_size // 2)
    out = layer(x)
    assert out.shape == reference(x).shape
    out.square().mean().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    # mult-adds by this project's counter against torch's own FLOP counter (2 FLOPs per multiply-add)
    with FlopCounterMode(display=False) as flops:
        layer(x[:1])
    assert count(layer, (32, 8, 8)).mult_adds == flops.get_total_flops() // 2
    assert count(layer, (32, 8, 8)).params == sum(p.numel() for p in layer.parameters())


@pytest.mark.parametrize("kernel_size, stride", [(3, 1), (3, 2), (1, 2)])
def test_acdc_shapes_gradients_and_the_specs_count(kernel_size, stride):
    layer = substitute_conv("ACDC_3", 32, 64, kernel_size, stride)
    x = torch.randn(2, 32, 8, 8)
    out = layer(x)
    assert out.shape == nn.Conv2d(32, 64, kernel_size, stride, kernel_size // 2)(x).shape
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    positions = out.shape[2] * out.shape[3]
    depthwise = 32 * x.shape[2] // stride * x.shape[3] // stride * 9 if kernel_size == 3 else 0
    by_hand = depthwise + positions * 3 * round(4 * 64 + 5 * 64 * 6)  # N = 64, log2 N = 6
    assert count(layer, (32, 8, 8)).mult_adds == by_hand
    assert count(layer, (32, 8, 8)).params == (32 * 9 if kernel_size == 3 else 0) + 2 * 3 * 64


@pytest.mark.parametrize("name", ["Sep", "Generic_0.5", "Shuffle_4", *CHEAP_POINTWISE, "ACDC_2"])
def test_a_1x1_conv_gets_no_depthwise_part(name):
    layer = substitute_conv(name, 32, 64, kernel_size=1)
    assert all(m.kernel_size == (1, 1) for m in layer.modules() if isinstance(m, nn.Conv2d))
    spatial = substitute_conv(name, 32, 64, kernel_size=3)
    assert any(
        m.kernel_size == (3, 3) and m.groups == m.in_channels for m in spatial.modules() if isinstance(m, nn.Conv2d)
    )


def test_substitute_names_are_checked():
    assert parse_substitute("Shuffle_4") == ("Shuffle", 4.0) and parse_substitute("Conv") == ("Conv", None)
    for bad, message in [
        ("Dense", "unknown conv substitute"),
        ("Shuffle", "needs its g"),
        ("Conv_2", "takes no"),
        ("Generic_x", "not a number"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_substitute(bad)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth=27)


@pytest.mark.parametrize("depth, width, params", [(28, 10, 36_479_194), (40, 2, 2_243_546), (16, 2, 691_674)])
def test_wrn_parameter_counts_match_the_spec(depth, width, params):
    net = WideResNet(depth, width)
    assert sum(p.numel() for p in net.parameters()) == params


def test_wrn_28_10_count_prints_the_original_numbers():
    result = count(WideResNet(28, 10), (3, 32, 32))
    assert result.mult_adds == 5_245_638_922
    assert result.summary() == "Mult-Adds: 5.24564E+09\nParams: 3.64792E+07\nSanity check, parameters: 3.64792E+07"


@pytest.mark.parametrize("conv", [*NAMES, *CHEAP_POINTWISE, "ACDC_4"])
def test_wrn_students_run_and_count_from_real_weight_shapes(conv):
    net = WideResNet(16, 2, conv=conv, in_channels=1)
    out = net(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    result = count(net, (1, 28, 28))
    assert result.params == result.sanity_params == sum(p.numel() for p in net.parameters())
    if conv != "Conv":
        assert result.params < count(WideResNet(16, 2, in_channels=1), (1, 28, 28)).params


def test_a_budget_picks_the_hyperparameter_and_says_so(capsys):
    generic = WideResNet(16, 2, conv="Generic", budget=1e5)
    params = sum(p.numel() for p in generic.parameters())
    assert 0.98e5 <= params <= 1e5 and generic.conv.startswith("Generic_")
    assert f"conv {generic.conv} gives {params:,}" in capsys.readouterr().out
    shuffle = WideResNet(16, 2, conv="Shuffle", budget=2.5e4)  # Shuffle_2 has 29,754, Shuffle_4 17,658
    g = int(shuffle.conv.split("_")[1])
    assert g > 1 and sum(p.numel() for p in shuffle.parameters()) <= 2.5e4
    assert (
        sum(p.numel() for p in WideResNet(16, 2, conv=f"Shuffle_{g - 1}").parameters()) > 2.5e4
    )  # the smallest g that fits
    with pytest.raises(ValueError, match="needs a substitute with a hyperparameter"):
        WideResNet(16, 2, conv="Sep", budget=1e5)
    with pytest.raises(ValueError, match="below the smallest"):
        WideResNet(16, 2, conv="Generic", budget=10)


@pytest.mark.parametrize("kind", ["SepHashed", "TensorTrain", "Tucker", "CP"])
def test_a_budget_is_met_within_two_percent_for_every_real_hyperparameter(kind, capsys):
    net = WideResNet(16, 2, conv=kind, budget=6e4)
    params = sum(p.numel() for p in net.parameters())
    assert 0.98 * 6e4 <= params <= 6e4 and net.conv.startswith(f"{kind}_")
    assert f"conv {net.conv} gives {params:,}" in capsys.readouterr().out


def test_an_acdc_budget_takes_the_most_factors_that_fit():
    net = WideResNet(16, 2, conv="ACDC", budget=3.5e4)
    n = int(net.conv.split("_")[1])
    assert sum(p.numel() for p in net.parameters()) <= 3.5e4
    assert sum(p.numel() for p in WideResNet(16, 2, conv=f"ACDC_{n + 1}").parameters()) > 3.5e4


def test_checkpointed_blocks_give_the_same_gradients_and_statistics():
    torch.manual_seed(0)
    plain = WideResNet(16, 2, conv="Shuffle_4", in_channels=1, dropout=0.3)
    checkpointed = copy.deepcopy(plain)
    for block in checkpointed.modules():
        if isinstance(block, WideBlock):
            block.checkpointed = True
    x = torch.randn(4, 1, 28, 28)
    for net in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout masks: checkpointing replays the random state
        net(x).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name
    for (name, b), c in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        assert torch.equal(b, c), name  # the recomputation does not count its batch twice
    assert WideResNet(16, 2, checkpoint_blocks=True).group2[0].checkpointed


def test_substitutes_get_compression_scaled_weight_decay():
    from functools import partial

    from lightning_modules import Compressed
    from lightning_modules.layers.substitutes import compression_ratios

    net = WideResNet(16, 2, conv="Shuffle_4")
    sgd = partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)
    optimizer = Compressed(net, optimizer=sgd).configure_optimizers()
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    conv1 = net.group1[0].conv1
    ratio = sum(p.numel() for p in conv1.parameters()) / (16 * 32 * 3 * 3)
    assert compression_ratios(net)["group1.0.conv1"] == pytest.approx(ratio) and ratio < 0.2
    assert all(decay_of[id(p)] == pytest.approx(5e-4 * ratio) for p in conv1.parameters())
    for full in (net.stem.weight, net.fc.weight, net.bn.weight):  # full layers keep the configured decay
        assert decay_of[id(full)] == 5e-4
    assert sorted(decay_of) == sorted(id(p) for p in net.parameters())  # every parameter in one group
    plain = Compressed(net, optimizer=sgd, scaled_weight_decay=False).configure_optimizers()
    assert {g["weight_decay"] for g in plain.param_groups} == {5e-4}
    teacher = Compressed(WideResNet(16, 2), optimizer=sgd).configure_optimizers()  # full convs: ratio 1
    assert [g["weight_decay"] for g in teacher.param_groups] == [5e-4]


def test_the_compression_pages_substitute_table_is_what_count_gives():
    readme = (ROOT / "docs" / "results" / "compression.md").read_text()
    table = readme[readme.index("WRN-28-10 with each substitute in its blocks") :].split("\n\n")[1]
    rows = [line.split("|")[1:4] for line in table.splitlines()[2:]]
    assert len(rows) >= 12
    for name, params, mult_adds in rows:
        conv = name.split()[0]
        with torch.device("meta"):  # shapes only: the count needs no weights
            net = WideResNet(28, 10, conv=conv)
        result = count(net, (3, 32, 32))
        assert (f"{result.params:.5E}", f"{result.mult_adds:.5E}") == (params.strip(), mult_adds.strip()), conv


ORIGINAL_WRN28_10 = {  # the spec's table: (params, mult-adds); None where this project does not reproduce it
    "Conv": ("3.64792E+07", "5.24564E+09"),
    "Shuffle_4": ("8.23674E+05", "1.17201E+08"),
    "Shuffle_8": ("5.63594E+05", "7.69784E+07"),
    "Shuffle_16": ("4.37354E+05", "6.07583E+07"),
    "Shuffle_32": ("3.78314E+05", "5.12965E+07"),
    "SepHashed_0.1": (None, "6.29697E+08"),  # the original hashed the depthwise part too: not offered
    "ACDC_11": ("5.55498E+05", None),  # the original's ACDC mult-add convention is not recorded
}


@pytest.mark.parametrize("conv", ORIGINAL_WRN28_10)
def test_wrn28_10_students_have_the_originals_counts(conv):
    with torch.device("meta"):
        net = WideResNet(28, 10, conv=conv)
    result = count(net, (3, 32, 32))
    params, mult_adds = ORIGINAL_WRN28_10[conv]
    assert params is None or f"{result.params:.5E}" == params
    assert mult_adds is None or f"{result.mult_adds:.5E}" == mult_adds


def test_shortcuts_stay_full_convs_unless_asked():
    plain, substituted = (
        WideResNet(16, 2, conv="Shuffle_4"),
        WideResNet(16, 2, conv="Shuffle_4", substitute_shortcuts=True),
    )
    shortcut = plain.group2[0].shortcut
    assert isinstance(shortcut, nn.Conv2d) and shortcut.kernel_size == (1, 1) and shortcut.groups == 1
    assert shortcut.stride == (2, 2) and shortcut.bias is None
    assert not isinstance(substituted.group2[0].shortcut, nn.Conv2d)  # a grouped Shuffle pointwise map
    assert isinstance(plain.group2[0].conv1, Shuffle)  # the 3x3 convs are substituted either way
    assert "substitute_shortcuts=False" in repr(plain)


def test_shuffle_uses_one_group_count_for_both_grouped_convs():
    def groups(block: nn.Module) -> list[int]:
        return [m.groups for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]

    assert groups(substitute_conv("Shuffle_8", 320, 640)) == [8, 8]
    assert groups(substitute_conv("Shuffle_16", 160, 160)) == [10, 10]  # mid = 40: 16 does not divide it
    first = substitute_conv("Shuffle_16", 16, 160)  # WRN-28-10's first block; per conv it was 8 and 10
    assert groups(first) == [8, 8] and first.groups == 8


def test_the_hashed_pointwise_conv_has_an_output_bias():
    hashed = HashedPointwise(8, 6, s=0.5)
    assert hashed.bias.shape == (6,) and hashed.weight.numel() == 24
    x = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hashed.bias.fill_(1.5)
    expected = F.conv2d(x, hashed.virtual_weight()) + 1.5
    torch.testing.assert_close(hashed(x), expected, rtol=1e-5, atol=1e-5)  # an output near 0 rounds apart
    assert HashedPointwise(8, 6, s=0.5, bias=False).bias is None


def test_grouped_conv_init_is_the_originals_unless_asked_per_group():
    """A Sep student's depthwise 3x3 over C = 160 channels: the original's fan-out (all of C_out) gives it C times
    less variance than He init; `per_group` gives it He's. Full convs start alike either way."""
    original = WideResNet(16, 10, conv="Sep")
    kaiming = copy.deepcopy(original)
    torch.manual_seed(0)
    init_convs(original)  # the default
    torch.manual_seed(0)
    for m in kaiming.modules():  # what the nets did before the switch: torch's fan_out for every conv
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    for a, b in zip(original.parameters(), kaiming.parameters(), strict=True):
        assert torch.equal(a, b)  # the default is exactly the original's init, draw for draw
    per_group = WideResNet(16, 10, conv="Sep", grouped_conv_init="per_group")
    depthwise, pointwise = original.group2[1].conv1[0], original.group2[1].conv1[1]
    assert depthwise.groups == depthwise.out_channels == 320 and pointwise.groups == 1
    he = math.sqrt(2 / 9)  # fan-out of one depthwise channel: 1 x 3 x 3
    assert depthwise.weight.std().item() == pytest.approx(he / math.sqrt(320), rel=0.05)
    assert per_group.group2[1].conv1[0].weight.std().item() == pytest.approx(he, rel=0.05)
    for net in (original, per_group):
        assert net.group2[1].conv1[1].weight.std().item() == pytest.approx(math.sqrt(2 / 320), rel=0.05)
    with pytest.raises(ValueError, match="'original' or 'per_group'"):
        WideResNet(16, 1, grouped_conv_init="he")
