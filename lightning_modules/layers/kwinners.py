"""k-winners-take-all activations with boosting (research line 5, Ahmad & Scheinkman 2019).

Pure functions (`winners`, `kwinners`, `update_duty_cycle`) wrapped by thin modules. A unit wins
when its boosted value x * exp(-boost_strength * duty_cycle) is at least the k-th largest of its
sample; winners keep their unboosted x, every other unit is 0, and gradients reach winners only.
The duty cycle (how often a unit won, over the last `duty_cycle_period` samples), the samples
seen and the current boost strength are buffers, so a resumed run continues exactly. Under
DDP the win counts of the global batch are summed over ranks, so every rank holds the same
duty cycles and they equal a single process's over the same global batches.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.collectives import sum_over_ranks


def winners(boosted: torch.Tensor, k: int, break_ties: bool = False) -> torch.Tensor:
    """Boolean mask of the winners along the last dim: values >= the k-th largest (exactly k with break_ties)."""
    n = boosted.shape[-1]
    if k <= 0:
        return torch.zeros_like(boosted, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(boosted, dtype=torch.bool)
    if break_ties:
        index = boosted.topk(k, dim=-1, sorted=False).indices
        return torch.zeros_like(boosted, dtype=torch.bool).scatter_(-1, index, True)
    kth = boosted.topk(k, dim=-1, sorted=True).values[..., -1:]
    return boosted >= kth


def kwinners(
    x: torch.Tensor, duty_cycle: torch.Tensor, k: int, boost_strength: torch.Tensor | float, break_ties: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-winners of each row of x (N, n) with boosting by `duty_cycle` (n,); returns (output, winner mask)."""
    boosted = x.detach() * torch.exp(-boost_strength * duty_cycle)
    mask = winners(boosted, k, break_ties)
    return x.masked_fill(~mask, 0.0), mask


def update_duty_cycle(
    duty_cycle: torch.Tensor, wins: torch.Tensor, batch: torch.Tensor | int, seen: torch.Tensor, period: int
) -> None:
    """duty <- (duty * (P - B) + wins) / P in place, P = min(period, samples seen including this batch B).

    `wins` counts per unit over the batch. P is never less than B (a batch larger than the period
    makes the duty cycle that batch's win rate), so the formula never weighs the past negatively.
    """
    period_now = torch.clamp(torch.clamp(seen, max=period), min=batch).to(duty_cycle.dtype)
    duty_cycle.mul_(period_now - batch).add_(wins.to(duty_cycle.dtype)).div_(period_now)


def global_wins(wins: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Win counts and batch size summed over DDP ranks (one all-reduce; unchanged in one process)."""
    counts, total = sum_over_ranks([wins, torch.tensor(float(batch), device=wins.device)], torch.float)
    return counts, total


class KWinnersBase(nn.Module):
    """The state and schedule shared by KWinners and KWinners2d: duty cycles, samples seen, boost strength."""

    def __init__(
        self,
        units: int,
        percent_on: float,
        k_inference_factor: float,
        boost_strength: float,
        boost_strength_factor: float,
        duty_cycle_period: int,
        break_ties: bool,
    ):
        super().__init__()
        if not 0.0 <= percent_on <= 1.0:
            raise ValueError(f"percent_on must be in [0, 1], got {percent_on}")
        if boost_strength < 0 or duty_cycle_period < 1:
            raise ValueError(
                f"boost_strength must be >= 0 and duty_cycle_period >= 1, got {boost_strength}, {duty_cycle_period}"
            )
        self.percent_on, self.k_inference_factor = percent_on, k_inference_factor
        self.initial_boost_strength, self.boost_strength_factor = boost_strength, boost_strength_factor
        self.duty_cycle_period, self.break_ties = duty_cycle_period, break_ties
        self.register_buffer("duty_cycle", torch.zeros(units))
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("boost_strength", torch.tensor(float(boost_strength)))

    def set_epoch(self, epoch: int) -> None:
        """Boost strength of epoch `epoch` (from 0): initial * factor ** epoch; idempotent, so a resume is exact."""
        self.boost_strength.fill_(self.initial_boost_strength * self.boost_strength_factor**epoch)

    def record(self, wins: torch.Tensor, batch: int) -> None:
        """Add one training batch's win counts per unit (summed over ranks) to the duty cycles."""
        wins, total = global_wins(wins, batch)
        self.samples_seen += total.long()
        update_duty_cycle(self.duty_cycle, wins, total, self.samples_seen, self.duty_cycle_period)

    def mult_adds(self, output: torch.Tensor) -> int:
        """Counted like an activation function: one per output element."""
        return output[0].numel()

    def _settings(self) -> str:
        return (
            f"percent_on={self.percent_on}, k_inference_factor={self.k_inference_factor}, "
            f"boost_strength={self.initial_boost_strength}, boost_strength_factor={self.boost_strength_factor}, "
            f"duty_cycle_period={self.duty_cycle_period}, break_ties={self.break_ties}"
        )


class KWinners(KWinnersBase):
    """k-winners over the n units of a (N, n) input: k = round(n * percent_on) in training,
    int(k * k_inference_factor) in evaluation."""

    def __init__(
        self,
        n: int,
        percent_on: float = 0.1,
        k_inference_factor: float = 1.5,
        boost_strength: float = 1.5,
        boost_strength_factor: float = 0.9,
        duty_cycle_period: int = 1000,
        break_ties: bool = False,
    ):
        """
        Args:
            n: units per sample.
            percent_on: fraction of units that win in training.
            k_inference_factor: winners in evaluation are int(k * this).
            boost_strength: initial boost strength (0: no boosting).
            boost_strength_factor: boost strength is multiplied by this at the start of every epoch.
            duty_cycle_period: the duty cycle averages wins over this many most recent samples.
            break_ties: exactly k winners (by topk) instead of every unit tied with the k-th.
        """
        super().__init__(
            n, percent_on, k_inference_factor, boost_strength, boost_strength_factor, duty_cycle_period, break_ties
        )
        self.n = n
        self.k = round(n * percent_on)
        self.k_inference = int(self.k * k_inference_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.n:
            raise ValueError(f"KWinners({self.n}) expects (N, {self.n}), got {tuple(x.shape)}")
        k = self.k if self.training else self.k_inference
        out, mask = kwinners(x, self.duty_cycle, k, self.boost_strength, self.break_ties)
        if self.training:
            self.record(mask.sum(dim=0), len(x))
        return out

    def extra_repr(self) -> str:
        return f"n={self.n}, k={self.k}, k_inference={self.k_inference}, {self._settings()}"


class KWinners2d(KWinnersBase):
    """k-winners over conv maps (N, C, H, W): global over all C*H*W units of a sample, or `local`:
    per position across channels. The duty cycle is per channel (wins / (H*W) per sample)."""

    def __init__(
        self,
        channels: int,
        percent_on: float = 0.1,
        k_inference_factor: float = 1.5,
        boost_strength: float = 1.5,
        boost_strength_factor: float = 0.9,
        duty_cycle_period: int = 1000,
        break_ties: bool = False,
        local: bool = False,
    ):
        """
        Args:
            channels: channels C of the input.
            percent_on: fraction of units that win in training (global: of C*H*W; local: of C per position).
            k_inference_factor: more winners in evaluation (global: round(n * percent_on * this),
                local: round(C * percent_on * this)).
            boost_strength: initial boost strength (0: no boosting).
            boost_strength_factor: boost strength is multiplied by this at the start of every epoch.
            duty_cycle_period: the duty cycle averages wins over this many most recent samples.
            break_ties: exactly k winners (by topk) instead of every unit tied with the k-th.
            local: winners per spatial position across channels instead of over the whole map.
        """
        super().__init__(
            channels,
            percent_on,
            k_inference_factor,
            boost_strength,
            boost_strength_factor,
            duty_cycle_period,
            break_ties,
        )
        self.channels, self.local = channels, local

    def ks(self, units: int) -> tuple[int, int]:
        """(training k, inference k) among `units` competing units (C*H*W global, C local)."""
        return round(units * self.percent_on), round(units * self.percent_on * self.k_inference_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"KWinners2d({self.channels}) expects (N, {self.channels}, H, W), got {tuple(x.shape)}")
        n, c, h, w = x.shape
        k_train, k_eval = self.ks(c if self.local else c * h * w)
        k = k_train if self.training else k_eval
        if self.local:  # channels last, so each position's C values are one row
            rows, duty = x.movedim(1, -1), self.duty_cycle
        else:  # one row of C*H*W per sample, each unit boosted by its channel's duty cycle
            rows, duty = x.reshape(n, -1), self.duty_cycle.repeat_interleave(h * w)
        out, mask = kwinners(rows, duty, k, self.boost_strength, self.break_ties)
        if self.local:
            out, mask = out.movedim(-1, 1), mask.movedim(-1, 1)
        else:
            out, mask = out.view_as(x), mask.view_as(x)
        if self.training:
            self.record(mask.sum(dim=(0, 2, 3)) / (h * w), n)
        return out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, local={self.local}, {self._settings()}"
