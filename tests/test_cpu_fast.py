"""The CPU-fast ELU and batch norm (layers/cpu_fast.py) compute what PyTorch's modules compute, to float rounding,
forward and backward, and a depth net trained with them follows the same losses."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.layers.cpu_fast import ELU, BatchNorm2d, with_pytorch_modules
from lightning_modules.nets.depth_cnn import DepthCNN


def hand_built() -> torch.Tensor:
    """Both sides of the kink, 0 and -0, tiny and huge magnitudes, infinities and a NaN."""
    special = [0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, -1e-4, 1e-4, -30.0, -1e4, 1e4, float("inf"), -float("inf")]
    return torch.cat([torch.linspace(-20, 5, 100_001), torch.tensor(special)])


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.1])
def test_elu_equals_pytorchs_in_value_and_gradient(alpha):
    x = hand_built().requires_grad_()
    reference = x.detach().clone().requires_grad_()
    out, want = ELU(alpha)(x), F.elu(reference, alpha)
    torch.testing.assert_close(out, want, rtol=0, atol=6e-8)  # exp(x) - 1 against expm1(x): one float32 rounding
    upstream = torch.randn_like(out)
    (grad,), (want_grad,) = torch.autograd.grad(out, x, upstream), torch.autograd.grad(want, reference, upstream)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-7 * upstream.abs().max().item())
    assert ELU(alpha)(torch.tensor([float("nan")])).isnan().all()


def test_elu_outside_its_fast_range_is_pytorchs_own():
    x = hand_built()
    assert torch.equal(ELU(2.0)(x), F.elu(x, 2.0))  # alpha > 1: the maximum would not be the ELU
    y = x.clone()
    ELU(inplace=True)(y)
    assert torch.equal(y, F.elu(x))
    assert isinstance(ELU(), nn.ELU)  # what the dead-unit rules and the recycler look for


@pytest.mark.parametrize("channels, reordered", [(4, True), (8, True), (16, False)])
def test_batch_norm_on_a_channels_last_map_equals_pytorchs(channels, reordered):
    torch.manual_seed(0)
    x = (torch.randn(32, channels, 9, 9) * 3 + 1).contiguous(memory_format=torch.channels_last)
    fast, stock = BatchNorm2d(channels), nn.BatchNorm2d(channels)
    nn.init.normal_(fast.weight)
    stock.load_state_dict(fast.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = fast(xa), stock(xb)
    assert out.is_contiguous(memory_format=torch.channels_last)  # the next conv gets the order it runs fastest in
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    want.backward(upstream)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.weight.grad, stock.weight.grad, rtol=1e-5, atol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fast, name), getattr(stock, name))
    fast.eval(), stock.eval()
    torch.testing.assert_close(fast(x), stock(x), rtol=1e-5, atol=1e-5)
    assert (x.shape[1] <= BatchNorm2d.max_channels_last) == reordered


@pytest.mark.parametrize("batch_norm, residual", [(False, False), (True, False), (True, True)])
def test_a_depth_net_trains_along_the_same_losses_as_with_pytorchs_modules(batch_norm, residual):
    """Twenty SGD steps of an ELU net (channels-last, as the Classifier runs it): every loss within 1e-4 relative
    (measured: 1e-7 to 1.5e-6; rounding differences grow as training goes on)."""
    torch.manual_seed(0)
    fast = DepthCNN(depth=12, activation="elu", batch_norm=batch_norm, residual=residual, init_std="fan_in")
    assert isinstance(fast.features[0].act, ELU) and isinstance(fast.features[0].norm, BatchNorm2d) == batch_norm
    stock = with_pytorch_modules(fast)
    assert type(stock.features[0].act) is nn.ELU
    data = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=data).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,), generator=data)
    losses = []
    for net in (fast, stock):
        net.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        own = []
        for _ in range(20):
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            own.append(loss.item())
        losses.append(torch.tensor(own))
    assert losses[0][-1] < 0.98 * losses[0][0]  # it learns
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=0)
