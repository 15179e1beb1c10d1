"""Sharpness (spec 08): Hessian-vector products, power iteration and Hutchinson's trace against closed forms and a
full Hessian, the preconditioned sharpness of Adam, the callback leaving the model as it was, in a fit, and on 2
ranks as on 1 process."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from callbacks import Sharpness
from callbacks.sharpness import sharpness_of
from lightning_modules import Classifier
from lightning_modules.nets import MLP
from lightning_modules.statistics.curvature import (
    adam_preconditioner,
    hessian_vector_product,
    hutchinson_trace,
    power_iteration,
    preconditioned,
    top_eigenvalue,
)
from tests.conftest import CONFIGS, QUIET, cli, on_two_gloo_ranks


def quadratic(matrix: torch.Tensor):
    """L = theta^T A theta / 2 at a random theta: its Hessian is A everywhere."""
    theta = torch.randn(len(matrix), dtype=torch.float64, requires_grad=True)
    loss = 0.5 * theta @ matrix @ theta
    (grad,) = torch.autograd.grad(loss, [theta], create_graph=True)
    return hessian_vector_product([grad], [theta])


def symmetric(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))  # fmt: skip
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def test_on_a_quadratic_the_top_eigenvalue_and_the_trace_are_the_hessians():
    matrix = symmetric([7.0, 3.0, 1.0, 0.5, -0.2, 0.1])
    hvp = quadratic(matrix)
    v = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(hvp(v), matrix @ v)
    top = power_iteration(hvp, 6, torch.Generator().manual_seed(0), tol=1e-10, max_iterations=500, dtype=torch.float64)
    assert top.converged and top.value == pytest.approx(7.0, rel=1e-6) and 2 < top.iterations < 500
    diagonal = quadratic(torch.diag(torch.tensor([4.0, -1.0, 2.5], dtype=torch.float64)))
    exact = hutchinson_trace(diagonal, 3, torch.Generator().manual_seed(1), probes=5, dtype=torch.float64)
    assert exact.value == pytest.approx(5.5, abs=1e-12) and exact.stderr == pytest.approx(0.0, abs=1e-12)
    estimate = hutchinson_trace(hvp, 6, torch.Generator().manual_seed(2), probes=4000, dtype=torch.float64)
    assert abs(estimate.value - float(matrix.trace())) < 4 * estimate.stderr and 0 < estimate.stderr < 0.2


def test_where_a_negative_eigenvalue_is_largest_in_magnitude_the_top_one_is_found_by_a_shift():
    hvp = quadratic(symmetric([2.0, 1.0, 0.3, -6.0, -1.0], seed=3))
    generator = torch.Generator().manual_seed(0)
    magnitude = power_iteration(hvp, 5, generator, tol=1e-12, max_iterations=2000, dtype=torch.float64)
    assert magnitude.value == pytest.approx(-6.0, rel=1e-6)  # power iteration alone: lambda_min
    top = top_eigenvalue(hvp, 5, torch.Generator().manual_seed(0), tol=1e-12, max_iterations=2000, dtype=torch.float64)
    assert top.converged and top.value == pytest.approx(2.0, rel=1e-6) and top.iterations > magnitude.iterations
    positive = top_eigenvalue(quadratic(symmetric([3.0, -1.0])), 2, torch.Generator().manual_seed(0), tol=1e-12,
                              max_iterations=2000, dtype=torch.float64)  # fmt: skip
    assert positive.value == pytest.approx(3.0, rel=1e-6)  # no shift needed


def test_the_iteration_limit_is_reported_as_not_converged():
    hvp = quadratic(symmetric([1.0, 0.999, 0.998, 0.5]))  # three nearly equal eigenvalues: slow convergence
    top = power_iteration(hvp, 4, torch.Generator().manual_seed(0), tol=1e-12, max_iterations=3, dtype=torch.float64)
    assert top.iterations == 3 and not top.converged


def test_on_a_tiny_mlp_products_eigenvalue_and_trace_match_the_full_hessian():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    params = list(net.parameters())
    shapes = [p.shape for p in params]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, [p.numel() for p in params])
        named = {n: t.view(s) for (n, _), t, s in zip(net.named_parameters(), pieces, shapes, strict=True)}
        return nn.functional.cross_entropy(torch.func.functional_call(net, named, (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in params])
    full = torch.autograd.functional.hessian(loss_of, theta)
    gradients = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), params, create_graph=True)
    hvp = hessian_vector_product(gradients, params)
    v = torch.randn(len(theta), dtype=torch.float64)
    torch.testing.assert_close(hvp(v), full @ v)
    eigenvalues = torch.linalg.eigvalsh(full)
    top = top_eigenvalue(hvp, len(theta), torch.Generator().manual_seed(0), tol=1e-10, max_iterations=2000,
                         dtype=torch.float64)  # fmt: skip
    assert top.value == pytest.approx(float(eigenvalues.max()), rel=1e-5)
    trace = hutchinson_trace(hvp, len(theta), torch.Generator().manual_seed(1), probes=3000, dtype=torch.float64)
    assert abs(trace.value - float(full.trace())) < 4 * trace.stderr


def test_preconditioned_sharpness_is_the_top_eigenvalue_of_p_inverse_h_and_adams_p_is_its_state():
    matrix = symmetric([5.0, 2.0, 1.0, 0.3])
    p = torch.tensor([4.0, 0.5, 2.0, 1.0], dtype=torch.float64)
    top = power_iteration(preconditioned(quadratic(matrix), p.rsqrt()), 4, torch.Generator().manual_seed(0),
                          tol=1e-12, max_iterations=1000, dtype=torch.float64)  # fmt: skip
    expected = max(np.linalg.eigvals((torch.diag(1 / p) @ matrix).numpy()).real)
    assert top.value == pytest.approx(expected, rel=1e-6)

    weight = nn.Parameter(torch.randn(3, 2))
    adam = torch.optim.Adam([weight], lr=0.1, betas=(0.9, 0.99), eps=1e-3)
    assert adam_preconditioner(adam, [weight]) is None  # no state before the first step
    grads = [torch.randn(3, 2) for _ in range(3)]
    for grad in grads:
        weight.grad = grad
        adam.step()
    v = sum(0.01 * 0.99 ** (2 - i) * g**2 for i, g in enumerate(grads))  # exp_avg_sq after 3 steps
    v_hat = v / (1 - 0.99**3)
    torch.testing.assert_close(adam_preconditioner(adam, [weight]), (v_hat.sqrt() + 1e-3).rsqrt().reshape(-1))


class Noisy(nn.Module):
    """A net with batch norm and dropout: what a probe must leave as it found it."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
                                    nn.Linear(16, 10))  # fmt: skip

    def forward(self, x):
        return self.layers(x)


def test_a_probe_leaves_weights_buffers_gradients_and_the_random_stream_as_they_were():
    torch.manual_seed(0)
    module = Classifier(Noisy()).train()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    grads = [p.grad.clone() for p in module.parameters()]
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    state = torch.get_rng_state()
    values = sharpness_of(module, (x, y), optimizer, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key  # batch norm's running statistics included
    assert all(torch.equal(p.grad, g) for p, g in zip(module.parameters(), grads, strict=True))
    assert values["sharpness/lambda_max"] > 0 and values["sharpness/trace"] != 0
    assert values["sharpness/threshold"] == pytest.approx(3.8 / 0.05) and values["sharpness/two_over_lr"] == 40
    again = sharpness_of(module, (x, y), optimizer, torch.Generator().manual_seed(0))
    assert again == values  # the same dropout masks, the same vectors: the same numbers


def test_a_fit_logs_sharpness_every_n_steps_and_at_its_end_against_adams_threshold(in_tmp):
    cli("fit", "--config", CONFIGS / "quickstart.yaml", "--trainer.max_steps", "3", "--trainer.callbacks+=Sharpness",
        "--trainer.callbacks.every_n_steps", "2", "--trainer.callbacks.probe_samples", "16",
        "--trainer.callbacks.iterations", "4", "--trainer.callbacks.trace_probes", "2",
        "--model.init_args.optimizer", "torch.optim.Adam", "--model.init_args.optimizer.lr", "0.001", *QUIET)  # fmt: skip
    rows = [r for r in csv_rows(in_tmp) if r.get("sharpness/lambda_max")]
    assert [r["step"] for r in rows] == ["0", "2", "3"]
    assert all(float(r["sharpness/preconditioned_threshold"]) == pytest.approx(38 / 0.001) for r in rows)
    assert np.isnan(float(rows[0]["sharpness/preconditioned"]))  # no Adam state before the first step
    assert all(float(r["sharpness/preconditioned"]) > 0 for r in rows[1:])
    assert all(1 <= float(r["sharpness/preconditioned_iterations"]) <= 8 for r in rows[1:])  # up to 4, twice
    assert all(float(r["sharpness/lambda_max"]) > 0 and 1 <= float(r["sharpness/iterations"]) <= 4 for r in rows)


def csv_rows(folder: Path) -> list[dict]:
    import csv

    return list(csv.DictReader(next((folder / "runs").rglob("metrics.csv")).open()))


def probe_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(48, 1, 8, 8, generator=generator), torch.randint(0, 10, (48,), generator=generator)


def half_probe_measures(rank: int) -> dict[str, float]:
    torch.manual_seed(0)
    module = Classifier(MLP(width=16, in_features=64)).train()
    x, y = probe_batch()
    part = (x[rank * 24 : (rank + 1) * 24], y[rank * 24 : (rank + 1) * 24])  # each rank its half
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    return sharpness_of(module, part, optimizer, torch.Generator().manual_seed(5), tol=1e-6, trace_probes=4)


@pytest.mark.subprocess
def test_two_ranks_with_half_the_probe_each_measure_what_one_process_measures_on_all_of_it(tmp_path):
    ranks = on_two_gloo_ranks(half_probe_measures, tmp_path)
    assert ranks[0] == ranks[1]  # every rank the same numbers
    torch.manual_seed(0)
    module = Classifier(MLP(width=16, in_features=64)).train()
    whole = sharpness_of(module, probe_batch(), torch.optim.SGD(module.parameters(), lr=0.1),
                         torch.Generator().manual_seed(5), tol=1e-6, trace_probes=4)  # fmt: skip
    assert ranks[0].keys() == whole.keys()
    for key, value in whole.items():
        assert ranks[0][key] == pytest.approx(value, rel=1e-4), key


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(Exception, match="every_n_steps"):
        Sharpness(every_n_steps=0)
    with pytest.raises(Exception, match="trace_probes"):
        Sharpness(trace_probes=0)


def test_a_callback_without_optimizer_thresholds_logs_the_measures_alone():
    torch.manual_seed(0)
    module = Classifier(MLP(width=8, in_features=64))
    values = sharpness_of(module, probe_batch(), None, torch.Generator().manual_seed(0), trace_probes=2)
    assert set(values) == {"sharpness/lambda_max", "sharpness/iterations", "sharpness/trace", "sharpness/trace_stderr"}
