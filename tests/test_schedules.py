"""PiecewiseLR: phases of absolute rates, then halving."""

import pytest
import torch

from lightning_modules import PiecewiseLR


def rates(scheduler: PiecewiseLR, epochs: int) -> list[float]:
    out = []
    for _ in range(epochs):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def optimizer() -> torch.optim.Optimizer:
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=123.0)


def test_phases_then_halving_every_n_epochs():
    lr = rates(PiecewiseLR(optimizer(), [[3, 1e-3], [2, 5e-4]], halve_every=2), 10)
    assert lr == pytest.approx([1e-3] * 3 + [5e-4] * 2 + [2.5e-4] * 2 + [1.25e-4] * 2 + [6.25e-5])


def test_last_rate_holds_without_halving_and_state_resumes():
    scheduler = PiecewiseLR(optimizer(), [[2, 0.1], [1, 0.01]])
    assert rates(scheduler, 5) == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.01])
    resumed = PiecewiseLR(optimizer(), [[2, 0.1], [1, 0.01]])
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.last_epoch == 5 and resumed.lr_at(1) == 0.1


@pytest.mark.parametrize("phases, halve", [([], None), ([[0, 0.1]], None), ([[1, 0.1]], 0)])
def test_bad_schedules_are_clear_errors(phases, halve):
    with pytest.raises(ValueError):
        PiecewiseLR(optimizer(), phases, halve_every=halve)
