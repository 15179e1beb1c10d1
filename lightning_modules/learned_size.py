"""Training a net whose layer size is learned (research line 3): task loss + lambda * the size penalty.

The net (e.g. `nets.MLP` with a flexible or sparsifier layer) provides `penalty()` and `sizes()`, and
a sparsifier net `prune(optimizer)`. Logged per epoch: `train/loss` (the task's cross-entropy alone,
comparable with static nets), `train/penalty` (lambda * penalty, the term added to it), accuracy,
and `size/<layer>` (x0, or the live units).
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric

from lightning_modules.classifier import Classifier
from lightning_modules.errors import ConfigError, require

# the size parameters themselves are never decayed unless their pattern says so: decay on x0 pulls
# the size to zero, on the liveness it adds an L2 penalty to the L1 one
SIZE_PARAMETERS = ("*.x0", "*.liveness")


class LearnedSize(Classifier):
    """The Classifier plus the net's size penalty, size logging and (for sparsifiers) pruning for real."""

    def __init__(self, net: nn.Module, penalty: float = 0.0, prune_every_n_epochs: int | None = 1, **kwargs):
        """
        Args:
            net: a net with `penalty()` and `sizes()` (e.g. `lightning_modules.nets.MLP`).
            penalty: lambda, the weight of the net's size penalty in the loss.
            prune_every_n_epochs: remove a sparsifier's dead units for real every this many epochs (null:
                never; they stay masked). Pruning changes parameter shapes, which DDP cannot follow, so a
                multi-process run needs null.
            **kwargs: the Classifier's settings (optimizer, scheduler, the divergence guard, ...). Its
                `param_groups` here: the size parameters (`*.x0`, `*.liveness`) get weight_decay 0 unless
                their pattern sets it, so the optimizer's weight decay is L2 on the weights alone (the spec's
                finding: with it a flexible layer's size plateaus).
        """
        require("non_negative", penalty=penalty)
        require("positive", prune_every_n_epochs=prune_every_n_epochs)
        super().__init__(net, **kwargs)
        for method in ("penalty", "sizes"):
            if not callable(getattr(net, method, None)):
                raise TypeError(f"{type(net).__name__} has no {method}(): LearnedSize needs a net with a sized layer")
        self.penalty = penalty
        self.prune_every_n_epochs = prune_every_n_epochs
        self.train_metrics["penalty"] = MeanMetric()

    def group_options(self) -> dict[str, dict[str, float]]:
        size_options = {p: {"weight_decay": 0.0, **self.param_groups.get(p, {})} for p in SIZE_PARAMETERS}
        rest = {p: options for p, options in self.param_groups.items() if p not in size_options}
        return {**size_options, **rest}  # size patterns first: a user's catch-all must not take them

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.prunes and self.trainer is not None and self.trainer.world_size > 1:
            raise ConfigError(
                "pruning changes parameter shapes, which DDP cannot follow: set "
                "model.init_args.prune_every_n_epochs: null for a multi-process run (dead units stay masked)"
            )

    @property
    def prunes(self) -> bool:
        return self.prune_every_n_epochs is not None and getattr(self.net, "layer", None) == "sparsifier"

    total_is_loss = False  # `train/loss` is the cross-entropy alone, comparable with a static net's

    def extra_loss(self, x, logits, y, split: str) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
        """Training adds lambda times the net's size penalty, logged as `train/penalty`."""
        if split != "train":
            return 0.0, {}
        penalty = self.penalty * self.net.penalty()
        return penalty, {"penalty": penalty}

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.prunes and (self.current_epoch + 1) % self.prune_every_n_epochs == 0:
            self.net.prune(self.trainer.optimizers[0])
        sizes = {f"size/{name}": size.float() for name, size in self.net.sizes().items()}
        self.log_dict(sizes, sync_dist=True, reduce_fx="max")  # the same on every rank

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Shrink a freshly built sparsifier to a pruned checkpoint's width before its weights are loaded."""
        super().on_load_checkpoint(checkpoint)
        liveness = checkpoint["state_dict"].get("net.hidden.liveness")
        if liveness is not None and getattr(self.net, "layer", None) == "sparsifier" and len(liveness) < self.net.width:
            self.net.prune(keep=torch.arange(len(liveness)))
