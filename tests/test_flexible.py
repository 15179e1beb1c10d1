"""FlexibleLinear and the soft size: stable over the whole range, in [0, N], x0 starts where configured."""

import itertools

import pytest
import torch

from lightning_modules.layers import FlexibleLinear, soft_size, unit_scales

X0 = [-1e4, -100.0, -1.0, 0.0, 5.5, 64.0, 127.0, 1e3, 1e4]
K = [0.01, 0.1, 1.0, 10.0, 100.0]


@pytest.mark.parametrize("x0, k", list(itertools.product(X0, K)))
def test_soft_size_is_finite_bounded_and_has_finite_gradients(x0, k):
    n = 128
    x0_t = torch.tensor(x0, requires_grad=True)
    size = soft_size(x0_t, k, n)
    size.backward()
    assert torch.isfinite(size) and 0 <= size.item() <= n
    assert torch.isfinite(x0_t.grad)
    scales = unit_scales(x0_t.detach(), k, n)
    assert torch.isfinite(scales).all() and (scales >= 0).all() and (scales <= 1).all()


@pytest.mark.parametrize("x0, k", [(5.5, 1.0), (64.0, 1.0), (64.0, 10.0), (100.0, 0.5)])
def test_soft_size_is_the_integral_of_the_scales(x0, k):
    n = 128
    # the sum over units approximates the integral to within one unit
    assert abs(soft_size(torch.tensor(x0), k, n).item() - unit_scales(torch.tensor(x0), k, n).sum().item()) < 1.0
    # and a fine Riemann sum matches it closely
    t = torch.linspace(0, n, 200001, dtype=torch.float64)
    riemann = torch.trapezoid(torch.sigmoid(k * (x0 - t)), t).item()
    assert soft_size(torch.tensor(x0, dtype=torch.float64), k, n).item() == pytest.approx(riemann, abs=1e-4)


def test_x0_starts_at_the_configured_size_and_gets_a_gradient():
    layer = FlexibleLinear(784, 500, start_size=123.0)
    assert layer.x0.item() == 123.0 and layer.size() == 123.0
    out = layer(torch.randn(4, 784))
    (out.square().sum() + layer.penalty()).backward()
    assert out.shape == (4, 500) and torch.isfinite(layer.x0.grad) and layer.x0.grad != 0
    with pytest.raises(ValueError, match="start_size"):
        FlexibleLinear(10, 5, start_size=6)


def test_units_right_of_x0_are_off_and_random_slopes_only_in_training():
    torch.manual_seed(0)
    layer = FlexibleLinear(8, 64, start_size=20.0, slope=100.0, activation="identity")
    out = layer(torch.randn(3, 8)).detach()
    assert (out[:, 25:] == 0).all() and (out[:, :15] != 0).all()
    random = FlexibleLinear(8, 64, start_size=20.0, random_slope=True)
    slopes = {float(random.current_slope()) for _ in range(20)}
    assert len(slopes) == 20 and all(10 / 20 <= k <= 10 / 1 for k in slopes)
    random.eval()
    assert random.current_slope() == 1.0
