"""The seeds of one search probe trained together as one grouped net (`nets.GroupedDepthCNN`), in a loop of its own.

Each member reproduces the fit a search trial runs for its seed (`search.DepthTrial`): its init, drawn after
seed_everything(seed); its data order and batch sizes; the Classifier's cross-entropy, optimizer and per-epoch
scheduler; its divergence guard; its errors after the last step, in evaluation mode. Only what a member trains on
crosses the loop, so a member's result equals its own fit's up to float rounding; `grouping_refusal` says which
settings this loop does not reproduce (those probes train one seed at a time).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.classifier import Classifier
from lightning_modules.nets.depth_cnn import DepthCNN
from lightning_modules.nets.grouped_depth_cnn import GroupedDepthCNN
from lightning_modules.run.console import say
from lightning_modules.studies.trials import portable

# optimizers whose update of an element depends on that element's gradient and state alone: a grouped net's
# members then update as their own nets would (not LBFGS, Adafactor's factored moments, or any norm-based one)
ELEMENTWISE = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
    torch.optim.RMSprop, torch.optim.Rprop, torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.ASGD,
)  # fmt: skip
# the trainer's precisions the grouped loop trains in, and their dtypes
DTYPES = {
    None: torch.float32, 32: torch.float32, "32": torch.float32, "32-true": torch.float32,
    64: torch.float64, "64": torch.float64, "64-true": torch.float64,
}  # fmt: skip


def grouping_refusal(
    template: pl.LightningModule, nets: list[nn.Module], datamodule: pl.LightningDataModule, trainer: pl.Trainer
) -> str | None:
    """Why the seeds of a probe cannot train grouped here, in a phrase; None when they can."""
    if type(template) is not Classifier:
        return f"the model is a {type(template).__name__}, whose training step the grouped loop does not reproduce"
    if template.recycle is not None or template.interventions is not None:
        return "the model recycles units or intervenes against loss of plasticity"
    if not all(isinstance(net, DepthCNN) for net in nets):
        return "a searched net is not a DepthCNN"
    if not callable(getattr(datamodule, "seeded_train_loader", None)) or datamodule.augment is not None:
        return f"{type(datamodule).__name__} does not give each seed's training order (or it augments)"
    probe = nn.Parameter(torch.zeros(1))
    optimizer = template.optimizer_factory([probe]) if template.optimizer_factory else None
    if optimizer is not None and not isinstance(optimizer, ELEMENTWISE):
        return f"{type(optimizer).__name__} does not update each parameter element on its own"
    if template.scheduler_factory is not None and isinstance(
        template.scheduler_factory(optimizer or torch.optim.SGD([probe], lr=0.1)),
        torch.optim.lr_scheduler.ReduceLROnPlateau,
    ):
        return "ReduceLROnPlateau follows one run's metric"
    if trainer.precision not in DTYPES:
        return f"precision {trainer.precision}: the grouped loop trains in float32 or float64"
    return None


class MemberGuard:
    """The Classifier's own divergence guard (`watch_loss`), its buffers one per member: a member diverged when its
    loss was ever non-finite, or (on_divergence: stop) went past max_loss_ratio times its first loss or past
    max_loss."""

    def __init__(self, model: Classifier, members: int, device: torch.device):
        for name, start in (("loss_finite", True), ("loss_exploded", False), ("first_loss", math.nan),
                            ("peak_loss", -math.inf)):  # fmt: skip
            setattr(model, name, torch.full((members,), start, device=device))  # the buffer, per member
        self.model, self.warned = model, False

    def watch(self, losses: torch.Tensor) -> None:
        self.model.watch_loss(losses)

    def diverged(self) -> torch.Tensor:
        """Which members diverged so far (a host sync); with on_divergence: warn, an exploded member is said once
        and trains on, as its own fit would."""
        model = self.model
        exploded = model.loss_exploded & model.loss_finite
        if model.on_divergence == "stop":
            return ~model.loss_finite | exploded
        if bool(exploded.any()) and not self.warned:
            say("warning: a grouped member's training loss exploded; training on (on_divergence: warn)")
            self.warned = True
        return ~model.loss_finite


@dataclass
class GroupedFit:
    """What `train_grouped` trained: each member's (training error over the whole training split, validation error),
    NaN for one that diverged; each member's rows per epoch (empty without `history`); the trained grouped net."""

    outcomes: list[tuple[float, float]]
    history: list[list[dict]]
    net: GroupedDepthCNN


def train_grouped(
    template: Classifier,
    members: list[DepthCNN],
    seeds: list[int],
    datamodule: pl.LightningDataModule,
    epochs: int,
    steps: int | None,
    device: torch.device,
    precision: str | int | None = None,
    history: bool = False,
) -> GroupedFit:
    """Train `members` (built after seed_everything of their `seeds`) together as `template`'s fits would train each:
    `steps` optimizer steps, or `epochs` epochs when `steps` is None, at the trainer's `precision` (32 or 64 bits,
    `grouping_refusal` refuses the others). With `history`, each member's rows per epoch
    (train/loss, val/err) for its W&B run."""
    model = copy.deepcopy(template)
    model.net = GroupedDepthCNN(members)
    dtype = DTYPES[precision]
    model.to(device=device, dtype=dtype)
    if model.channels_last:
        model.net.to(memory_format=torch.channels_last)
    optimizer = model.build_optimizer(model.named_parameters())
    scheduler = model.scheduler_factory(optimizer) if model.scheduler_factory is not None else None
    data = portable(datamodule, device)
    guard = MemberGuard(model, len(members), device)
    budget = steps if steps else math.inf
    rows: list[list[dict]] = [[] for _ in members]
    step, epoch = 0, 0
    while step < budget and (steps or epoch < epochs):
        model.train()
        loaders = [data.seeded_train_loader(seed, epoch) for seed in seeds]
        total, samples = torch.zeros(len(members), device=device), 0
        for index, batches in enumerate(zip(*loaders, strict=True)):
            x = torch.cat([images for images, _ in batches], dim=1).to(dtype)  # member s's images: its own channels
            y = torch.stack([labels for _, labels in batches], dim=1)  # (B, members)
            each = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(0)  # each member's mean loss
            optimizer.zero_grad(set_to_none=True)
            each.sum().backward()  # the sum's gradient in a member's parameters is that member's loss's alone
            optimizer.step()
            guard.watch(each)
            total += each.detach() * len(y)
            samples += len(y)
            step += 1
            if step >= budget or ((index + 1) % model.finite_check_every == 0 and bool(guard.diverged().all())):
                break
        if history:
            val = member_errors(model, data.eval_dataloader("val"), len(members))
            for s, row in enumerate(rows):
                row.append({"epoch": epoch, "train/loss": float(total[s] / samples), "val/err": val[s]})
        if bool(guard.diverged().all()):
            break
        if scheduler is not None:
            scheduler.step()
        epoch += 1
    diverged = guard.diverged().tolist()
    train_errors = member_errors(model, data.eval_dataloader("train"), len(members), exact=True)
    val_errors = member_errors(model, data.eval_dataloader("val"), len(members))
    outcomes = [
        (math.nan, math.nan) if d else (t, v) for d, t, v in zip(diverged, train_errors, val_errors, strict=True)
    ]
    return GroupedFit(outcomes, rows, model.net)


def member_errors(model: Classifier, loader, members: int, exact: bool = False) -> list[float]:
    """Each member's error over a split's loader, in evaluation mode: as `search.error_rate` counts it (`exact`), or
    as the Classifier logs `<split>/err` (1 - its float32 accuracy)."""
    errors = torch.zeros(members, dtype=torch.long, device=model.device)
    total = 0
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            logits = model(x.to(model.device, model.dtype).repeat(1, members, 1, 1))
            errors += (logits.argmax(dim=2) != y.to(model.device)[:, None]).sum(0)
            total += len(y)
    if exact:
        return [int(e) / max(total, 1) for e in errors.tolist()]
    right = (total - errors).float() / torch.tensor(float(total))  # torchmetrics' float32 division
    return (1 - right).tolist()
