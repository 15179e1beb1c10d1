"""Training dynamics on the dashboard: per-layer gradient norm, weight norm and update ratio, the global gradient
norm and every parameter group's learning rate, every `every_n_steps` optimizer steps (spec 06).

Gradients are read in `on_before_optimizer_step`: after gradient accumulation, after mixed precision's
unscaling (the true gradients; where a fused Adam or AdamW unscales them in its own step they are still scaled
there, and the norms are divided by the scale), after DDP's averaging over ranks, and before any clipping. A
`SparseWeights` layer's gradient counts on its kept entries only: the masked ones never move a weight. Weights
are read there and again after the step, for the update ratio. Everything is computed on the device on logged steps
only and reaches the host once per logged step; nothing is computed between them. Under DDP the gradients
and weights are the same on every rank: rank 0 measures and logs, and no collective is added.
"""

from __future__ import annotations

import fnmatch

import pytorch_lightning as pl
import torch
from torch import nn

from callbacks.activation_observer import layer_name, network_of, report_names
from lightning_modules.errors import ConfigError, require
from lightning_modules.layers.sparse_weights import SparseWeights


def weighted_layers(net: nn.Module, names: tuple[str, ...] = ("*",)) -> dict[str, nn.Module]:
    """The layers with a weight matrix or kernel (a `weight` parameter of 2 or more dimensions: Linear, Conv, the
    substitutes' parts; not batch norm's scale) whose path matches one of `names` (fnmatch), by report name: a
    block's `conv` or `linear` goes by its block's name, as the activation callbacks name it (`conv1_1`)."""
    chosen = {}
    for path, module in net.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() >= 2 and weight.requires_grad:
            if any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(layer_name(path), p) for p in names):
                chosen[path] = module
    return report_names(chosen)


def weight_masks(net: nn.Module) -> dict[int, torch.Tensor]:
    """The mask of every `SparseWeights` weight in `net`, by the id of the weight parameter it masks."""
    return {id(m.module.weight): m.weight_mask for m in net.modules() if isinstance(m, SparseWeights)}


def loss_scale(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> float:
    """The factor the gradients still carry in `on_before_optimizer_step`: the grad scaler's scale (16-mixed) when
    the optimizer unscales them in its own step (fused Adam and AdamW; Lightning then skips `unscale_`), else 1."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    # private to torch: how GradScaler and Lightning tell such optimizers (see run/library_internals.py)
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return 1.0
    return scaler.get_scale()


def group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    """A name per parameter group: its `name` (the Classifier's groups: their pattern, and `base` for the parameters
    no pattern matched), else `group<i>`."""
    return [str(group.get("name", f"group{i}")) for i, group in enumerate(optimizer.param_groups)]


class TrainingDynamics(pl.Callback):
    """Logs `grad_norm/<layer>`, `weight_norm/<layer>`, `update_ratio/<layer>`, `grad_norm/total` and `lr/<group>`
    every `every_n_steps` optimizer steps, to every logger (CSV and W&B), at the step's index."""

    def __init__(self, every_n_steps: int = 50, names: tuple[str, ...] = ("*",)):
        """
        Args:
            every_n_steps: measure on optimizer steps 0, N, 2N, ... (each costs a few norms and a copy of the
                monitored weights; between them nothing is computed).
            names: monitor the weighted layers whose path in the net matches one of these patterns (fnmatch).
        """
        require("positive", every_n_steps=every_n_steps)
        self.every_n_steps, self.names = every_n_steps, tuple(names)
        self.layers: dict[str, nn.Module] = {}
        self.masks: dict[int, torch.Tensor] = {}  # SparseWeights' masks, by the id of the weight they mask
        self._step: int | None = None  # the optimizer step measured, until its update is known
        self._values: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.layers = weighted_layers(network_of(pl_module), self.names)
        if not self.layers:
            raise ConfigError(f"TrainingDynamics: no layer with weights matches names {list(self.names)}")
        self.masks = weight_masks(network_of(pl_module))

    def gradient_norm(self, parameter: nn.Parameter, scale: float) -> torch.Tensor:
        """The norm of the gradient that moves `parameter`: unscaled, and on a sparse weight's kept entries only."""
        grad = parameter.grad.float()
        mask = self.masks.get(id(parameter))
        return (grad if mask is None else grad * mask).norm() / scale

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        step = trainer.global_step  # the index of the step about to be taken
        if step % self.every_n_steps or not trainer.is_global_zero:
            return
        values, scale = {}, loss_scale(trainer, optimizer)
        for name, module in self.layers.items():
            grads = [self.gradient_norm(p, scale) for p in module.parameters(recurse=False) if p.grad is not None]
            if grads:
                values[f"grad_norm/{name}"] = torch.linalg.vector_norm(torch.stack(grads))
            values[f"weight_norm/{name}"] = module.weight.detach().float().norm()
        every = [self.gradient_norm(p, scale) for p in pl_module.parameters() if p.grad is not None]
        if every:
            values["grad_norm/total"] = torch.linalg.vector_norm(torch.stack(every))
        for name, group in zip(group_names(optimizer), optimizer.param_groups, strict=True):
            values[f"lr/{name}"] = torch.tensor(float(group["lr"]), device=pl_module.device)
        self._step, self._values = step, values
        self._before = {name: module.weight.detach().clone() for name, module in self.layers.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._step is None or trainer.global_step == self._step:  # no step yet (gradient accumulation)
            return
        values = self._values
        for name, module in self.layers.items():
            before = self._before[name].float()
            values[f"update_ratio/{name}"] = (module.weight.detach().float() - before).norm() / before.norm()
        step, self._step, self._values, self._before = self._step, None, {}, {}
        host = torch.stack([v.float() for v in values.values()]).cpu()  # one transfer for all of them
        numbers = dict(zip(values, host.tolist(), strict=True), epoch=trainer.current_epoch)
        for logger in trainer.loggers:  # at the index of the step measured, as Lightning logs a training step's
            logger.log_metrics(numbers, step=step)
