"""The VGG nets of the dead-unit study, built from the original list format."""

import math

import pytest
import torch
import yaml
from torch import nn

from lightning_modules.nets import VGG
from lightning_modules.run.config_files import net_from_config
from tests.conftest import CONFIGS

NETS = sorted((CONFIGS / "dead_units" / "nets").glob("*.yaml"))
SMALL = [("conv1_1", (8, None)), ("pool1", (2, 2)), ("conv2_1", (16, 0.5)), ("fc3", (32, 0.5)), ("logit", (None, None))]


@pytest.mark.parametrize("path", NETS, ids=lambda p: p.stem)
def test_every_ready_net_runs_and_names_its_blocks_like_the_original(path):
    net = net_from_config(path)
    args = yaml.safe_load(path.read_text())["init_args"]
    size, channels = args.get("input_size", 32), args.get("in_channels", 3)
    out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    names = [name for name, _ in net.named_children()]
    assert names[0] == "conv1_1" and "logit" in names and "pool1" in names


def test_vgg16_has_thirteen_convs_and_the_original_widths():
    net = net_from_config(CONFIGS / "dead_units" / "nets" / "vgg16.yaml")
    widths = [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert net.fc6.linear.in_features == 512  # 32 px halved five times: 1x1x512 into fc6


def test_entries_become_the_layers_they_name():
    net = VGG(SMALL, in_channels=3, input_size=8)
    assert isinstance(net.conv1_1.act, nn.ReLU) and net.conv1_1.act.inplace
    assert isinstance(net.conv2_1.drop, nn.Dropout) and net.conv2_1.drop.p == 0.5
    assert isinstance(net.flatten, nn.Flatten) and net.fc3.linear.in_features == 16 * 4 * 4
    assert isinstance(net.fc3.drop, nn.Dropout) and not hasattr(net.conv1_1, "drop")
    assert net.logit.out_features == 10 and net.logit.in_features == 32


def test_dropout2d_and_batch_norm_switches():
    net = VGG(SMALL, in_channels=3, input_size=8, dropout2d=True, batch_norm=True)
    assert isinstance(net.conv2_1.drop, nn.Dropout2d) and isinstance(net.conv1_1.norm, nn.BatchNorm2d)
    assert type(net.fc3.drop) is nn.Dropout  # channel dropout only applies to feature maps
    plain = VGG(SMALL, in_channels=3, input_size=8)
    assert not hasattr(plain.conv1_1, "norm")


@pytest.mark.parametrize(
    "init, fan", [("fan_in", lambda c: 9 * c.in_channels), ("fan_out", lambda c: 9 * c.out_channels)]
)
def test_he_init_uses_the_chosen_fan(init, fan):
    torch.manual_seed(0)
    net = VGG([("conv1_1", (256, None)), ("conv2_1", (64, None)), ("logit", (None, None))], 128, 4, init=init)
    for conv in (net.conv1_1.conv, net.conv2_1.conv):
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan(conv)), rel=0.03)
        assert torch.all(conv.bias == 0)


def test_torch_init_is_the_smaller_default():
    torch.manual_seed(0)
    conv = VGG([("conv1_1", (256, None)), ("logit", (None, None))], 128, 4, init="torch").conv1_1.conv
    assert conv.weight.std().item() == pytest.approx(math.sqrt(1 / (3 * 9 * 128)), rel=0.03)


@pytest.mark.parametrize(
    "conf, message",
    [
        ([("conv1", (8, None)), ("conv1", (8, None)), ("logit", (None, None))], "appears twice"),
        ([("conv1", (8, None)), ("bogus", (1, None)), ("logit", (None, None))], "unknown layer kind"),
        ([("conv1", (8, None))], "must end with a `logit`"),
        ([("pool1", (2, 2)), ("pool2", (2, 2)), ("pool3", (2, 2)), ("logit", (None, None))], "below one pixel"),
        ([("fc1", (8, None)), ("conv2", (8, None)), ("logit", (None, None))], "after the net was flattened"),
    ],
)
def test_bad_model_conf_is_a_clear_error(conf, message):
    with pytest.raises(ValueError, match=message):
        VGG(conf, in_channels=3, input_size=4)
