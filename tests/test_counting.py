"""`count`: hand-computed counts, an independent counter, and the printed format."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_modules.counting import count
from lightning_modules.nets import DepthCNN
from tests.conftest import CONFIGS, QUIET, cli


def test_hand_counted_small_net():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )
    result = count(net, (3, 8, 8))
    conv1 = 8 * 8 * 8 * (3 * 9)  # 8 channels x 8x8 positions, each 3 inputs x 9 taps
    relu = 8 * 8 * 8
    grouped = 8 * 4 * 4 * (2 * 9)  # groups=4: 2 input channels per output
    tanh = 8 * 4 * 4
    depthwise = 8 * 4 * 4 * 9
    linear = 128 * 5 + 5  # weights, plus one per bias
    assert result.mult_adds == conv1 + relu + grouped + tanh + depthwise + linear
    assert result.params == sum(p.numel() for p in net.parameters()) == result.sanity_params


def test_depth_cnn_hand_count():
    result = count(DepthCNN(depth=3, activation="tanh"), (1, 28, 28))
    convs = 4 * 28 * 28 * 9 * 1 + 8 * 14 * 14 * 9 * 4 + 16 * 7 * 7 * 9 * 8
    acts = 4 * 28 * 28 + 8 * 14 * 14 + 16 * 7 * 7
    assert result.mult_adds == convs + acts + 144 * 10 + 10


@pytest.mark.parametrize("groups", [1, 2, 16])
def test_matches_torch_flop_counter_on_conv_linear_nets(groups):
    net = nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1, groups=groups, bias=False),
        nn.Conv2d(32, 32, 1, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10, bias=False),
    )
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 16, 16, 16))
    assert count(net, (16, 16, 16)).mult_adds == counter.get_total_flops() // 2  # flops = 2 x multiply-adds


def test_shared_module_costs_twice_but_owns_parameters_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    result = count(Twice(), (4,))
    assert result.params == 20 and result.mult_adds == 2 * 20


def test_parameters_of_non_leaf_modules_are_counted():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) * self.scale

    result = count(Scaled(), (3,))
    assert result.params == result.sanity_params == 15


def test_count_leaves_the_net_as_it_was():
    net = DepthCNN(depth=3, batch_norm=True).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    count(net, (1, 28, 28))
    assert net.training
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_count_subcommand_prints_the_original_format(capsys):
    cli("count", "--config", CONFIGS / "quickstart.yaml", "--per_layer", "true", *QUIET)
    out = capsys.readouterr().out
    net = DepthCNN(depth=9, activation="elu", batch_norm=True, residual=True)
    expected = count(net, (1, 28, 28))
    assert f"Mult-Adds: {expected.mult_adds:.5E}" in out
    assert f"Params: {expected.params:.5E}" in out
    assert f"Sanity check, parameters: {sum(p.numel() for p in net.parameters()):.5E}" in out
    assert "| features.0.conv | Conv2d | 4x28x28 | 40 | 28,224 |" in out
