"""k-winners: exact winners on hand-built inputs, boosting, inference k, duty cycles by hand, the schedule."""

import math

import pytest
import torch

from lightning_modules.layers import KWinners, KWinners2d
from lightning_modules.layers.kwinners import update_duty_cycle, winners


def rows(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_winners_keep_the_k_largest_and_ties_with_the_kth():
    assert winners(rows([1, 3, 2, 5]), 2).tolist() == [[False, True, False, True]]
    assert winners(rows([3, 2, 2, 0]), 2).tolist() == [[True, True, True, False]]  # a tie with the 2nd: 3 winners
    exact = winners(rows([3, 2, 2, 0]), 2, break_ties=True)
    assert exact.sum().item() == 2 and exact[0, 0] and not exact[0, 3]
    assert winners(rows([1, 2, 3]), 0).sum() == 0 and winners(rows([1, 2, 3]), 3).all()


def layer(n: int = 4, **kwargs) -> KWinners:
    settings = dict(percent_on=0.5, boost_strength=0.0, k_inference_factor=1.0, duty_cycle_period=1000)
    return KWinners(n, **{**settings, **kwargs})


def test_outputs_are_the_unboosted_values_of_the_winners_and_zero_elsewhere():
    kw = layer(4, boost_strength=1.0)
    kw.duty_cycle.copy_(torch.tensor([0.0, 0.0, 0.0, 0.5]))
    out = kw.eval()(rows([1.0, 3.0, 2.0, 5.0]))
    # boosted 5 * e^-0.5 = 3.03 still wins; the output keeps 5, not 3.03
    assert out.tolist() == [[0.0, 3.0, 0.0, 5.0]]


def test_k_zero_and_k_n():
    x = rows([1.0, -2.0, 3.0, 0.5])
    assert torch.equal(layer(percent_on=0.0)(x), torch.zeros_like(x))
    assert torch.equal(layer(percent_on=1.0)(x), x)


def test_training_k_against_inference_k():
    kw = layer(10, percent_on=0.2, k_inference_factor=1.5)
    assert (kw.k, kw.k_inference) == (2, 3)
    x = torch.arange(10.0).unsqueeze(0)
    assert kw.train()(x).nonzero()[:, 1].tolist() == [8, 9]
    assert kw.eval()(x).nonzero()[:, 1].tolist() == [7, 8, 9]
    assert KWinners(12544, percent_on=0.095, k_inference_factor=1.5).k_inference == int(1192 * 1.5)


def test_boosting_changes_the_winners_of_the_next_call():
    kw = layer(4, percent_on=0.25, boost_strength=1.0)
    x = rows([1.0, 0.9, 0.0, 0.0])
    assert kw.train()(x).nonzero()[:, 1].tolist() == [0]
    assert kw.duty_cycle.tolist() == [1.0, 0.0, 0.0, 0.0]  # one sample seen: P = 1
    assert kw(x).nonzero()[:, 1].tolist() == [1]  # 1 * e^-1 = 0.37 < 0.9


def test_duty_cycles_after_three_batches_by_hand():
    kw = layer(3, percent_on=1 / 3, duty_cycle_period=4).train()
    kw(rows([3, 1, 0], [0, 2, 1]))  # wins [1, 1, 0]; L = 2, P = 2
    assert kw.duty_cycle.tolist() == pytest.approx([0.5, 0.5, 0.0])
    kw(rows([0, 0, 5], [0, 0, 5]))  # wins [0, 0, 2]; L = 4, P = 4: (d * 2 + w) / 4
    assert kw.duty_cycle.tolist() == pytest.approx([0.25, 0.25, 0.5])
    kw(rows([1, 0, 0], [1, 0, 0]))  # wins [2, 0, 0]; L = 6, P = 4
    assert kw.duty_cycle.tolist() == pytest.approx([0.625, 0.125, 0.25])
    assert kw.samples_seen.item() == 6
    kw.eval()(rows([0, 0, 9]))  # evaluation never updates
    assert kw.duty_cycle.tolist() == pytest.approx([0.625, 0.125, 0.25]) and kw.samples_seen.item() == 6


def test_a_batch_larger_than_the_period_gives_its_own_win_rate():
    duty = torch.tensor([0.9, 0.1])
    update_duty_cycle(duty, torch.tensor([1.0, 3.0]), 4, torch.tensor(4), period=2)
    assert duty.tolist() == [0.25, 0.75]


def test_gradients_flow_through_winners_only():
    x = rows([1.0, 3.0, 2.0, 5.0]).requires_grad_()
    layer(4).train()(x).mul(torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert x.grad.tolist() == [[0.0, 2.0, 0.0, 4.0]]


def test_2d_global_against_local_winners():
    # channel 0 = [5, 4], channel 1 = [6, 1] at two positions
    x = torch.tensor([[5.0, 4.0], [6.0, 1.0]]).view(1, 2, 1, 2)
    settings = dict(percent_on=0.5, boost_strength=0.0, k_inference_factor=1.0)
    glob = KWinners2d(2, **settings).train()(x)
    assert glob.view(2, 2).tolist() == [[5.0, 0.0], [6.0, 0.0]]  # the two largest of all four
    local = KWinners2d(2, local=True, **settings).train()
    assert local(x).view(2, 2).tolist() == [[0.0, 4.0], [6.0, 0.0]]  # the larger channel at each position
    assert local.duty_cycle.tolist() == [0.5, 0.5]  # one win per channel over H*W = 2 positions


def test_2d_duty_cycle_is_per_channel_over_positions():
    kw = KWinners2d(3, percent_on=1 / 3, boost_strength=0.0, k_inference_factor=1.0).train()
    x = torch.zeros(2, 3, 2, 2)
    x[0, 0] = torch.tensor([[9.0, 8.0], [7.0, 6.0]])  # k = round(12 / 3) = 4: all four positions of channel 0
    x[1, 2] = torch.tensor([[9.0, 8.0], [7.0, 6.0]])
    out = kw(x)
    assert torch.equal(out, x)
    assert kw.duty_cycle.tolist() == pytest.approx([0.5, 0.0, 0.5])  # (4 + 0) / 4 positions / 2 samples


def test_boost_strength_follows_the_epoch_and_lives_in_the_state_dict():
    kw = KWinners(10, boost_strength=1.5, boost_strength_factor=0.9)
    kw.set_epoch(3)
    assert kw.boost_strength.item() == pytest.approx(1.5 * 0.9**3)
    kw.set_epoch(3)  # idempotent: a resumed epoch does not decay twice
    assert kw.boost_strength.item() == pytest.approx(1.5 * 0.9**3)
    assert {"duty_cycle", "samples_seen", "boost_strength"} <= set(kw.state_dict())


def test_extra_repr_shows_every_setting():
    text = repr(KWinners2d(64, percent_on=0.095, boost_strength=1.5, boost_strength_factor=0.9, local=True))
    for setting in (
        "channels=64",
        "local=True",
        "percent_on=0.095",
        "boost_strength=1.5",
        "boost_strength_factor=0.9",
        "k_inference_factor=1.5",
        "duty_cycle_period=1000",
        "break_ties=False",
    ):
        assert setting in text, setting
    assert "k=100, k_inference=150" in repr(KWinners(1000, percent_on=0.1))


def test_boosting_favours_units_that_rarely_win():
    """Over many batches of noise with one unit biased up, boosting spreads the wins (duty cycles closer)."""
    torch.manual_seed(0)
    x = torch.randn(400, 32, 20)
    x[:, :, 0] += 1.0
    spread = {}
    for boost in (0.0, 3.0):
        kw = KWinners(20, percent_on=0.1, boost_strength=boost, duty_cycle_period=200).train()
        for batch in x:
            kw(batch)
        spread[boost] = kw.duty_cycle.max().item() - kw.duty_cycle.min().item()
    assert spread[3.0] < 0.5 * spread[0.0]
    assert math.isclose(KWinners(20, percent_on=0.1).k / 20, 0.1)
