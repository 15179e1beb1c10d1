"""Sharpness of the training loss as training goes (spec 08): the top Hessian eigenvalue against the edge of
stability, and the Hessian's trace, on a fixed probe batch."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from callbacks.activation_observer import log_now
from lightning_modules.collectives import all_reduce_sum, world_size
from lightning_modules.errors import require
from lightning_modules.statistics.curvature import (
    adam_preconditioner,
    hessian_vector_product,
    hutchinson_trace,
    preconditioned,
    top_eigenvalue,
)


class Sharpness(pl.Callback):
    """Every `every_n_steps` optimizer steps (before the step is taken) and at the end of training, on a probe batch
    fixed at the first training batch (each DDP rank its own part of it), in training mode (batch norm's running
    statistics restored after), logs:

    - `sharpness/lambda_max`: the top eigenvalue of the Hessian of the task loss, by power iteration on
      Hessian-vector products (`sharpness/iterations`: the products it took);
    - `sharpness/trace` and `sharpness/trace_stderr`: Hutchinson's estimate of the Hessian's trace;
    - `sharpness/two_over_lr`: 2 / lr; `sharpness/threshold`: where the edge of stability lies for SGD (Cohen et
      al., 2021): 2 / lr, (2 + 2 beta) / lr with heavy-ball momentum beta;
    - for Adam and AdamW, `sharpness/preconditioned`: lambda_max(P^-1 H), P = diag(sqrt(v_hat) + eps) from the
      optimizer's state, and `sharpness/preconditioned_threshold`: (2 + 2 beta_1) / ((1 - beta_1) lr) (Cohen et
      al., 2022).

    The thresholds need one learning rate (and momentum or betas) for all parameter groups; they are left out
    otherwise. The weights, buffers, gradients and random state are as they were after it. Under DDP each product is averaged
    over the ranks (one all-reduce) and the random vectors are drawn alike on every rank.
    """

    def __init__(
        self,
        every_n_steps: int = 2500,
        probe_samples: int = 256,
        iterations: int = 20,
        tol: float = 1e-3,
        trace_probes: int = 10,
        seed: int = 0,
    ):
        """
        Args:
            every_n_steps: measure before optimizer steps 0, N, 2N, ... and after the last one.
            probe_samples: the probe batch, per rank: the first samples of the first training batch.
            iterations: the most Hessian-vector products of the power iteration.
            tol: it stops when the Rayleigh quotient changes by less than this, relative.
            trace_probes: Rademacher vectors of the trace's estimate.
            seed: the random vectors at step s come from (seed, s).
        """
        require("positive", every_n_steps=every_n_steps, probe_samples=probe_samples, iterations=iterations,
                trace_probes=trace_probes, tol=tol)  # fmt: skip
        self.every_n_steps, self.probe_samples, self.iterations = every_n_steps, probe_samples, iterations
        self.tol, self.trace_probes, self.seed = tol, trace_probes, seed
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self.measured_at: int | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.probe is None:
            x, y = batch[0], batch[1]
            self.probe = (x[: self.probe_samples].detach().clone(), y[: self.probe_samples].detach().clone())
        if trainer.global_step % self.every_n_steps == 0:
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is not None:
            self.measure(trainer, pl_module)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if self.measured_at == step:  # once a step (gradient accumulation, the end right after a measurement)
            return
        self.measured_at = step
        values = sharpness_of(
            pl_module, self.probe, trainer.optimizers[0] if trainer.optimizers else None,
            torch.Generator().manual_seed((self.seed << 32) + step), self.iterations, self.tol, self.trace_probes,
        )  # fmt: skip
        if trainer.is_global_zero:
            log_now(trainer, values)

    def state_dict(self) -> dict:
        return {"probe": [t.cpu() for t in self.probe]} if self.probe is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:  # a resumed run measures on the same probe
        probe = state_dict.get("probe")
        self.probe = tuple(probe) if probe else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.probe is not None:
            self.probe = tuple(t.to(pl_module.device) for t in self.probe)


def task_loss(pl_module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The module's task loss on a batch (the Classifier's `task_loss`), else cross-entropy."""
    logits = pl_module(x)
    if hasattr(pl_module, "task_loss"):
        return pl_module.task_loss(x, logits, y)
    return F.cross_entropy(logits, y)


def sharpness_of(
    pl_module: torch.nn.Module,
    probe: tuple[torch.Tensor, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
    iterations: int = 20,
    tol: float = 1e-3,
    trace_probes: int = 10,
) -> dict[str, float]:
    """The measures of `Sharpness` on one probe batch, the module left as it was."""
    params = [p for p in pl_module.parameters() if p.requires_grad]
    buffers = [b.detach().clone() for b in pl_module.buffers()]
    x, y = probe
    try:
        return measures(pl_module, x, y, params, optimizer, generator, iterations, tol, trace_probes)
    finally:  # batch norm's running statistics as the probe's forward found them (after the products: the graph
        with torch.no_grad():  # holds them)
            for buffer, saved in zip(pl_module.buffers(), buffers, strict=True):
                buffer.copy_(saved)


def measures(
    pl_module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, params: list[torch.Tensor],
    optimizer: torch.optim.Optimizer | None, generator: torch.Generator, iterations: int, tol: float,
    trace_probes: int,
) -> dict[str, float]:  # fmt: skip
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():  # dropout draws its masks off the run's stream
        gradients = torch.autograd.grad(task_loss(pl_module, x, y), params, create_graph=True)
    local = hessian_vector_product(gradients, params)
    ranks = world_size()

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(local(v)) / ranks if ranks > 1 else local(v)

    size, device, dtype = sum(p.numel() for p in params), params[0].device, params[0].dtype
    top = top_eigenvalue(hvp, size, generator, device, tol, iterations, dtype)
    trace = hutchinson_trace(hvp, size, generator, trace_probes, device, dtype)
    values = {"sharpness/lambda_max": top.value, "sharpness/iterations": float(top.iterations),
              "sharpness/trace": trace.value, "sharpness/trace_stderr": trace.stderr}  # fmt: skip
    groups = optimizer.param_groups if optimizer is not None else []
    settings = {(g["lr"], g.get("momentum"), tuple(g.get("betas", ()))) for g in groups}
    if len(settings) != 1:  # no optimizer, or groups that step differently: no one edge to compare with
        return values
    group = groups[0]
    values["sharpness/two_over_lr"] = 2 / group["lr"]
    if isinstance(optimizer, torch.optim.SGD):
        values["sharpness/threshold"] = (2 + 2 * group.get("momentum", 0.0)) / group["lr"]
    elif isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        beta1 = group["betas"][0]
        values["sharpness/preconditioned_threshold"] = (2 + 2 * beta1) / ((1 - beta1) * group["lr"])
        inverse_sqrt = adam_preconditioner(optimizer, params)
        if inverse_sqrt is None:  # before the first step: no second moments yet
            values["sharpness/preconditioned"] = values["sharpness/preconditioned_iterations"] = math.nan
        else:
            top = top_eigenvalue(preconditioned(hvp, inverse_sqrt), size, generator, device, tol, iterations, dtype)
            values["sharpness/preconditioned"] = top.value
            values["sharpness/preconditioned_iterations"] = float(top.iterations)
    return values
