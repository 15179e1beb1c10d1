"""Each DDP rank its own random stream: augmentation and dropout draws differ between ranks, reproducibly.

`seed_everything` seeds every rank alike, which is what building the model needs (equal initial weights
on all ranks). From then on it is wrong: every rank would crop, flip, cut out, change speed and drop
the same units at the same batch positions, so a 2-GPU run lacks the diversity of one device training
on the same global batch. Once the model is built, each rank r reseeds torch (every device), numpy and
`random` from (seed, r); one process is left as it is. The data order is not affected: it comes
from the datamodules' own seeded generators, which must agree over the ranks.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def rank_seed(seed: int, rank: int) -> int:
    """A seed for rank `rank` of a run seeded with `seed`, independent of every other (seed, rank) pair
    (unlike seed + rank, which gives run 1's rank 0 the stream of run 0's rank 1)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint32)[0])


def seed_this_rank(rank: int, world_size: int) -> int | None:
    """Reseed this process's random streams from (the run's seed, rank) when there are several ranks; return the
    seed used (None: one process, or a run that set no seed, whose ranks already draw apart)."""
    seed = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything (LightningCLI's `seed_everything`)
    if world_size <= 1 or seed is None:
        return None
    own = rank_seed(int(seed), rank)
    torch.manual_seed(own)  # the default generator of every device
    np.random.seed(own)
    random.seed(own)
    return own
