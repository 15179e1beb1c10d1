"""SparsifierLinear: pruning shrinks the tensors, keeps the outputs and keeps the optimizer consistent."""

import pytest
import torch
from torch import nn

from lightning_modules.layers import SparsifierLinear


def kill_units(layer: SparsifierLinear) -> None:
    with torch.no_grad():
        layer.liveness[[1, 4, 5, 9]] = torch.tensor([0.0, 1e-4, -5e-4, 0.0])  # four dead units (threshold 1e-3)


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, torch.optim.SGD])
def test_pruned_net_equals_the_masked_net_and_keeps_training(optimizer_class):
    torch.manual_seed(0)
    net = nn.Sequential(SparsifierLinear(12, 10, threshold=1e-3), nn.Linear(10, 3))
    kwargs = {"momentum": 0.9} if optimizer_class is torch.optim.SGD else {}
    optimizer = optimizer_class(net.parameters(), lr=1e-2, **kwargs)
    x = torch.randn(32, 12)
    net(x).square().sum().backward()
    optimizer.step()  # optimizer state now exists for every parameter
    optimizer.zero_grad()
    layer, head = net[0], net[1]
    kill_units(layer)
    with torch.no_grad():  # the masked net: dead units' liveness set to exactly zero
        masked = net(x) - (layer.act(layer.linear(x)) * layer.liveness.clamp(min=0) * ~layer.alive()) @ head.weight.T
    keep = layer.prune(head, optimizer)

    assert keep.tolist() == [0, 2, 3, 6, 7, 8] and layer.size() == 6
    assert layer.linear.weight.shape == (6, 12) and layer.linear.bias.shape == (6,) and head.weight.shape == (3, 6)
    assert layer.linear.out_features == head.in_features == 6
    assert torch.allclose(net(x), masked, atol=1e-6)
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert params == {id(p) for p in net.parameters()}
    for p in net.parameters():
        for value in optimizer.state[p].values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert value.shape == p.shape
    net(x).square().sum().backward()
    optimizer.step()  # steps on the smaller tensors without a shape error
    assert sum(p.numel() for p in net.parameters()) == 6 * 12 + 6 + 6 + 3 * 6 + 3


def test_penalty_and_size():
    layer = SparsifierLinear(4, 5)
    assert layer.penalty().item() == 5 and layer.size() == 5
    with torch.no_grad():
        layer.liveness[0] = -2.0
        layer.liveness[1] = 0.0
    assert layer.penalty().item() == 3 and layer.size() == 3  # a liveness at or below zero is off: 3 x 1
    x = torch.randn(6, 4)
    out = layer(x)
    assert (out[:, :2] == 0).all()
    (out.sum() + layer.penalty()).backward()
    assert (layer.liveness.grad[:2] == 0).all() and (layer.liveness.grad[2:] != 0).all()  # no way back
