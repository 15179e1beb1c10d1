"""Learning-rate schedules written the way papers state them: "25 epochs at 1e-3, 25 at 5e-4, then halve every 10"."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class PiecewiseLR(LRScheduler):
    """Absolute learning rates per phase of epochs, then optional halving; stepped once per epoch.

    `phases=[[25, 1e-3], [25, 5e-4]], halve_every=10` gives 1e-3 for epochs 0-24, 5e-4 for 25-49,
    2.5e-4 for 50-59, 1.25e-4 for 60-69, ... Without `halve_every` the last rate holds. The rates
    replace the optimizer's own `lr` for every parameter group.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        phases: list[tuple[int, float]],
        halve_every: int | None = None,
        last_epoch: int = -1,
    ):
        """
        Args:
            optimizer: the wrapped optimizer.
            phases: (epochs, lr) pairs, in order.
            halve_every: after the phases, halve the last rate every this many epochs.
            last_epoch: the index of the last epoch, when resuming by hand (Lightning restores it itself).
        """
        if not phases or any(epochs < 1 or lr < 0 for epochs, lr in phases):
            raise ValueError(f"phases must be (epochs >= 1, lr >= 0) pairs, got {phases}")
        if halve_every is not None and halve_every < 1:
            raise ValueError(f"halve_every must be >= 1, got {halve_every}")
        self.phases = [(int(epochs), float(lr)) for epochs, lr in phases]
        self.halve_every = halve_every
        super().__init__(optimizer, last_epoch)

    def lr_at(self, epoch: int) -> float:
        """The learning rate of a (0-based) epoch."""
        start = 0
        for epochs, lr in self.phases:
            if epoch < start + epochs:
                return lr
            start += epochs
        last = self.phases[-1][1]
        if self.halve_every is None:
            return last
        return last * 0.5 ** (1 + (epoch - start) // self.halve_every)

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch)] * len(self.optimizer.param_groups)
