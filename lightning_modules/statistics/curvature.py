"""Sharpness of a loss (spec 08): Hessian-vector products, the top eigenvalue by power iteration and the trace by
Hutchinson's estimator, on flat vectors over a list of parameters.

Everything takes `hvp`, a function from a flat vector v to the flat H v, so the same estimators serve a plain
Hessian, a preconditioned one (P^-1/2 H P^-1/2, whose eigenvalues are those of P^-1 H) and one averaged over DDP
ranks. Random vectors come from a CPU generator the caller seeds, alike on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Hvp = Callable[[torch.Tensor], torch.Tensor]


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def hessian_vector_product(gradients: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> Hvp:
    """H v = d/dtheta (grad L . v) (Pearlmutter, 1994), from the gradients of L taken with `create_graph=True`:
    each product is one backward pass through that graph (which it keeps for the next)."""
    grad = flat(gradients)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        parts = torch.autograd.grad(grad, params, grad_outputs=v, retain_graph=True, allow_unused=True)
        return flat([torch.zeros_like(p) if g is None else g for g, p in zip(parts, params, strict=True)]).detach()

    return hvp


@dataclass(frozen=True)
class TopEigenvalue:
    value: float
    iterations: int  # products taken (the last one gave `value`)
    converged: bool  # the Rayleigh quotient changed by less than the tolerance before the iteration limit


def power_iteration(
    hvp: Hvp, size: int, generator: torch.Generator, device: torch.device | str = "cpu", tol: float = 1e-3,
    max_iterations: int = 20, dtype: torch.dtype = torch.float32,
) -> TopEigenvalue:  # fmt: skip
    """The eigenvalue of largest magnitude of a symmetric H: v <- H v / ||H v|| from a random start (standard normal
    from `generator`), until the Rayleigh quotient v . H v changes by less than `tol` relative to it, or after
    `max_iterations` products. `top_eigenvalue` turns it into the largest one."""
    v = torch.randn(size, generator=generator, dtype=torch.float64).to(device, dtype)
    v /= v.norm()
    value, previous = math.nan, math.nan
    for iteration in range(1, max_iterations + 1):
        hv = hvp(v)
        value = float(torch.dot(v, hv))  # one host read a product: the loop decides on it
        norm = hv.norm()
        if not math.isfinite(value) or float(norm) == 0.0:
            return TopEigenvalue(value, iteration, False)
        if iteration > 1 and abs(value - previous) <= tol * abs(value):
            return TopEigenvalue(value, iteration, True)
        previous, v = value, hv / norm
    return TopEigenvalue(value, max_iterations, False)


def top_eigenvalue(
    hvp: Hvp, size: int, generator: torch.Generator, device: torch.device | str = "cpu", tol: float = 1e-3,
    max_iterations: int = 20, dtype: torch.dtype = torch.float32,
) -> TopEigenvalue:  # fmt: skip
    """lambda_max, the largest eigenvalue of a symmetric H (the sharpness): power iteration, and where the eigenvalue
    of largest magnitude it finds is negative (lambda_min: away from a minimum, or a preconditioner that magnifies a
    direction of negative curvature), power iteration again on H - lambda_min I, whose eigenvalues lambda_i -
    lambda_min are all >= 0 and largest at lambda_max. Up to twice the products; `iterations` counts them all."""
    first = power_iteration(hvp, size, generator, device, tol, max_iterations, dtype)
    if not first.value < 0:
        return first
    shift = first.value
    second = power_iteration(lambda v: hvp(v) - shift * v, size, generator, device, tol, max_iterations, dtype)
    return TopEigenvalue(second.value + shift, first.iterations + second.iterations, second.converged)


@dataclass(frozen=True)
class Trace:
    value: float
    stderr: float  # the standard error of the mean over the probes
    probes: int


def hutchinson_trace(
    hvp: Hvp, size: int, generator: torch.Generator, probes: int = 10, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Trace:  # fmt: skip
    """tr(H) ~ (1/m) sum_j z_j . H z_j with z_j Rademacher (+-1, from `generator`), and its standard error
    sd / sqrt(m). Exact for a diagonal H."""
    samples = []
    for _ in range(probes):
        z = (torch.randint(0, 2, (size,), generator=generator) * 2 - 1).to(device, dtype)
        samples.append(torch.dot(z, hvp(z)))
    values = torch.stack(samples).double().cpu()
    stderr = float(values.std(unbiased=True) / math.sqrt(probes)) if probes > 1 else math.nan
    return Trace(float(values.mean()), stderr, probes)


def preconditioned(hvp: Hvp, inverse_sqrt: torch.Tensor) -> Hvp:
    """The products of P^-1/2 H P^-1/2 for a diagonal P (given as P^-1/2): symmetric, with the eigenvalues of
    P^-1 H, so power iteration finds the preconditioned sharpness lambda_max(P^-1 H)."""
    return lambda v: inverse_sqrt * hvp(inverse_sqrt * v)


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """P^-1/2 for Adam (Cohen et al., 2022): P = diag(sqrt(v_hat) + eps), v_hat = exp_avg_sq / (1 - beta_2^t), from
    the optimizer's state; None before its first step or for parameters it does not hold."""
    parts = []
    for param in params:
        state = optimizer.state.get(param, {})
        group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
        if "exp_avg_sq" not in state or group is None:
            return None
        step = float(state["step"])
        v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** step)
        parts.append((v_hat.sqrt() + group["eps"]).rsqrt().reshape(-1))
    return torch.cat(parts)
