"""Randomness under DDP: each rank draws its own augmentations and dropout masks, from equal initial weights."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from datamodules.augment import BatchAugment
from datamodules.tensor_data import Split, TensorDataModule
from lightning_modules import Classifier
from lightning_modules.run.rank_seeds import rank_seed, seed_this_rank
from tests.conftest import ddp_from_forkserver


class SameImages(TensorDataModule):
    """64 copies of one left-right asymmetric image: whatever sample a rank gets, only the draws differ."""

    mean, std, num_classes, input_shape = (0.0,), (1.0,), 10, (1, 4, 4)
    augment = BatchAugment(flip=True)

    def __init__(self):
        super().__init__(batch_size=16, val_size=8, on_device=False)

    def load(self) -> tuple[Split, Split]:
        image = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)  # positive, brighter to the right
        images = image.repeat(64, 1, 1, 1)
        return Split(images, torch.arange(64) % 10), Split(images[:8], torch.arange(8))


def dropout_net() -> nn.Module:
    return nn.Sequential(nn.Dropout(0.5), nn.Flatten(), nn.Linear(16, 10))


class Recorder(pl.Callback):
    """Saves, per rank: the weights at the start of training, the first batch as augmented, the first dropout mask."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.record: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.record["weights"] = torch.cat([p.detach().flatten().clone() for p in pl_module.net.parameters()])
        pl_module.net[0].register_forward_hook(self.mask)

    def mask(self, module, inputs, output) -> None:
        self.record.setdefault("mask", (output == 0).clone())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.record.setdefault("batch", batch[0].clone())

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(self.record, self.folder / f"rank{trainer.global_rank}.pt")


def fit(folder: Path, devices: int, strategy="auto") -> list[dict]:
    pl.seed_everything(3, verbose=False)
    model = Classifier(dropout_net(), channels_last=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[Recorder(folder)],
    )  # fmt: skip
    trainer.fit(model, datamodule=SameImages())
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(devices)]


@pytest.mark.slow
@pytest.mark.subprocess
def test_ddp_ranks_draw_their_own_augmentations_and_dropout_masks_from_equal_weights(tmp_path):
    ranks = fit(tmp_path, devices=2, strategy=ddp_from_forkserver())
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    # the same image at every position of both ranks' batches: only the flips drawn tell them apart
    assert not torch.equal(ranks[0]["batch"], ranks[1]["batch"])
    assert not torch.equal(ranks[0]["mask"], ranks[1]["mask"])
    for record in ranks:
        flipped = (record["batch"][:, 0, 0, 0] > record["batch"][:, 0, 0, 3]).sum()  # brighter to the left
        assert 0 < flipped < len(record["batch"])  # each rank flips about half its samples, not all or none


def test_one_process_is_left_as_it_was(tmp_path, monkeypatch):
    with_reseed = fit(tmp_path, devices=1)[0]
    monkeypatch.setattr("lightning_modules.classifier.seed_this_rank", lambda rank, world: None)
    without = fit(tmp_path, devices=1)[0]
    for key in ("weights", "batch", "mask"):
        assert torch.equal(with_reseed[key], without[key]), key


def test_rank_seeds_differ_per_rank_and_per_run_and_repeat(monkeypatch):
    seeds = {(s, r): rank_seed(s, r) for s in range(3) for r in range(4)}
    assert len(set(seeds.values())) == len(seeds)  # run 1's rank 0 is not run 0's rank 1 (seed + rank would be)
    assert rank_seed(1, 0) == seeds[(1, 0)]
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    assert seed_this_rank(1, 2) == seeds[(1, 1)]
    first = torch.rand(3)
    seed_this_rank(1, 2)
    assert torch.equal(torch.rand(3), first)  # reproducible run to run
    assert seed_this_rank(0, 1) is None  # one process: nothing reseeded
