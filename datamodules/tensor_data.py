"""In-memory image datasets: uint8 tensors on the training device, batches cut by index.

Small datasets (MNIST, CIFAR-10, the sklearn digits) fit in memory many times over, so
the per-sample Dataset/PIL path is pure overhead. Here a whole split is one tensor and a
batch is one `index_select`, normalised on the fly on whatever device holds the data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytorch_lightning as pl
import torch

from lightning_modules.errors import UserError, require


class DataError(UserError):
    """A problem with a dataset that a user fixes by hand; the CLI prints it as one line."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset's files are missing and could not be downloaded; the message says where to put them."""


def download_failure(error: Exception) -> str:
    """Why a download failed, in one short line (torchvision's message lists every mirror over several lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[-1].strip("<>()") if lines else type(error).__name__
    return f"the download failed ({reason[:160]})"


class CorruptDataError(DataError, ValueError):
    """A dataset file exists but does not hold what its format promises."""


class SplitSizeError(DataError, ValueError):
    """The requested validation or test split does not fit the dataset (or the DDP ranks that evaluate it)."""


class NoTestSplitError(DataError, ValueError):
    """The data has no test split: its source has none and none was held out (`test_size`)."""


@dataclass
class Split:
    """One split of a dataset: uint8 images (N, C, H, W) or int16 waveforms (N, L), and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        image = self.images.dtype == torch.uint8 and self.images.dim() == 4
        waveform = self.images.dtype == torch.int16 and self.images.dim() == 2
        if not (image or waveform):
            raise CorruptDataError(
                f"samples must be uint8 images (N, C, H, W) or int16 waveforms (N, L), "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise CorruptDataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])

    def to(self, device: torch.device) -> Split:
        if self.images.device == torch.device(device):
            return self
        return Split(self.images.to(device), self.labels.to(device))


def moved_splits(splits: dict[str, Split], device: torch.device | str) -> dict[str, Split]:
    """The splits on `device`."""
    return {name: split.to(device) for name, split in splits.items()}


class ShardedOrder:
    """The sample order of one epoch for one rank; `set_epoch` reshuffles, like DistributedSampler.

    With `pad=True` (training) every rank gets the same count, repeating samples from the start
    of the order to fill up, as DistributedSampler does. With `pad=False` (evaluation) nothing is
    repeated, so counts over the dataset stay exact; ranks then differ by at most one sample.
    """

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1, pad: bool = True):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.size / self.world_size)
        return len(range(self.rank, self.size, self.world_size))

    def indices(self) -> torch.Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        if self.pad and self.size % self.world_size:
            total = math.ceil(self.size / self.world_size) * self.world_size
            order = torch.cat([order, order.repeat(math.ceil(total / self.size))[: total - self.size]])
        return order[self.rank :: self.world_size]


class TensorLoader:
    """Iterates (images, labels) batches of a `Split`, normalised to float32 on the split's device.

    Lightning sees a loader with a `sampler` (so it calls `set_epoch` each epoch) and no batch sampler.
    """

    batch_sampler = None

    def __init__(
        self,
        split: Split,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        sampler: ShardedOrder,
        drop_last: bool = False,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        noise: float = 0.0,
        noise_seed: int = 0,
    ):
        self.split, self.batch_size, self.sampler, self.drop_last = split, batch_size, sampler, drop_last
        self.augment, self.noise = augment, noise
        device = split.images.device
        self.generator = torch.Generator(device).manual_seed(noise_seed) if noise else None
        # x / 255 - mean) / std  ==  x * scale + shift, one fused pass per batch
        std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, device=device).view(1, -1, 1, 1) / std_t

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        order = self.sampler.indices().to(self.split.images.device)
        start, self._resume_at = getattr(self, "_resume_at", 0), 0
        for b in range(start, len(self)):
            self._yielded = b + 1
            yield self.batch(order[b * self.batch_size : (b + 1) * self.batch_size])
        self._yielded = 0

    def state_dict(self) -> dict[str, int]:
        """Where the current pass is (batches handed out), so that a mid-epoch checkpoint resumes exactly
        there: Lightning saves it with the checkpoint and restores it before the resumed epoch."""
        return {"batches": getattr(self, "_yielded", 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = int(state.get("batches", 0))

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at `index`, normalised (and augmented, if the loader augments)."""
        images = torch.addcmul(self.shift, self.split.images.index_select(0, index).float(), self.scale)
        if self.noise:
            images = pixel_noise(images, self.noise, self.generator)
        if self.augment:
            images = self.augment(images)
        return images, self.split.labels.index_select(0, index)


def pixel_noise(images: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """The paper's MNIST noise on normalised images: round(fraction * H * W) random pixels of each image
    (all channels) set to mean + 2 std before normalising, which is 2.0 after."""
    n, _, h, w = images.shape
    count = round(fraction * h * w)
    if count == 0:
        return images
    scores = torch.rand(n, h * w, generator=generator, device=images.device)
    chosen = torch.zeros(n, h * w, dtype=torch.bool, device=images.device)
    chosen.scatter_(1, scores.topk(count, dim=1).indices, True)
    return images.masked_fill(chosen.view(n, 1, h, w), 2.0)


class TensorDataModule(pl.LightningDataModule):
    """Base of the in-memory datamodules: splits a train pool into train/val, places data, builds loaders.

    Subclasses set `mean`, `std`, `num_classes`, `input_shape` and implement `load()`; a subclass
    that augments sets `augment`, applied to training batches only.
    """

    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    unused_settings = {  # a Lightning habit with no use here, and why: the CLI says it when one is given
        "num_workers": "its splits are tensors in memory, each batch one index slice in this process, "
        "so there are no loader workers to start (drop --data.num_workers)"
    }

    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    input_shape: tuple[int, int, int]

    def __init__(
        self,
        batch_size: int = 256,
        val_size: int = 5000,
        seed: int = 0,
        on_device: bool = True,
        first_epoch_batch_size: int | None = None,
        test_size: int = 0,
    ):
        """
        Args:
            batch_size: samples per batch, per device.
            val_size: samples held out of the training pool for validation.
            seed: seed of the train/validation (and held-out test) split.
            on_device: keep the data on the training device (GPU) instead of host memory.
            first_epoch_batch_size: a different training batch size for the first epoch only.
            test_size: for a source without a test split of its own: samples held out of the pool as the
                test split, disjoint from train and validation (0: no test split, so `test` refuses).
        """
        require("positive", batch_size=batch_size, val_size=val_size, first_epoch_batch_size=first_epoch_batch_size)
        require("non_negative", test_size=test_size)
        super().__init__()
        self.batch_size, self.val_size, self.seed, self.on_device = batch_size, val_size, seed, on_device
        self.first_epoch_batch_size, self.test_size = first_epoch_batch_size, test_size
        self.splits: dict[str, Split] = {}
        self.shuffle_seed = seed

    def load(self) -> tuple[Split, Split | None]:
        """Read the training pool and the official test split (None when the source has none)."""
        raise NotImplementedError

    def make_splits(self) -> dict[str, Split]:
        """train/val/test from the pool in one seeded order: its first `val_size` samples validate, the next
        `test_size` test when the source has no test split of its own (else `test` is the official one), the
        rest train. Without either there is no `test` split: no test metric is ever computed on samples that
        trained or validated."""
        pool, test = self.load()
        if test is not None and self.test_size:
            raise SplitSizeError(
                f"test_size={self.test_size}: {type(self).__name__} has an official test split; test_size holds "
                f"one out only where the source has none"
            )
        held = self.val_size + self.test_size
        if held >= len(pool):
            sizes = f"val_size={self.val_size} and test_size={self.test_size} together" if self.test_size else (
                f"val_size={self.val_size}"
            )  # fmt: skip
            raise SplitSizeError(
                f"{sizes} must be between 1 and {len(pool) - 1}: the training pool has {len(pool)} samples"
            )
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(self.seed))
        splits = {"train": pool.subset(order[held:]), "val": pool.subset(order[: self.val_size])}
        if test is not None:
            splits["test"] = test
        elif self.test_size:
            splits["test"] = pool.subset(order[self.val_size : held])
        return splits

    def no_test_split(self) -> str:
        """What to do when asked for a test split the data does not have (subclasses name their settings)."""
        return (
            f"{type(self).__name__} has no test split: its source has none and none is held out. Set "
            f"--data.test_size N to hold out N samples of the pool as one (disjoint from train and validation)"
        )

    def split(self, name: str) -> Split:
        """A split by name; asking for a test split that does not exist is one clear error."""
        if name == "test" and name not in self.splits and self.splits:
            raise NoTestSplitError(self.no_test_split())
        if name not in self.splits:
            raise ValueError(f"unknown split {name!r}: one of {sorted(self.splits)}")
        return self.splits[name]

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = self.make_splits()
        device = (
            self.trainer.strategy.root_device if self.trainer is not None and self.on_device else torch.device("cpu")
        )
        self.splits = moved_splits(self.splits, device)
        # every rank must shuffle alike: take rank 0's seed (itself set by seed_everything)
        seed = torch.initial_seed() % 2**31
        self.shuffle_seed = self.trainer.strategy.broadcast(seed) if self.trainer is not None else seed
        if (
            self.first_epoch_batch_size
            and self.trainer is not None
            and not self.trainer.reload_dataloaders_every_n_epochs
        ):
            # the first epoch's loader differs from the others: the trainer must ask for a new one each epoch
            self.trainer.reload_dataloaders_every_n_epochs = 1

    def train_batch_size(self, epoch: int | None = None) -> int:
        """The training batch size of `epoch` (default: the trainer's current one)."""
        if epoch is None:
            epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return self.first_epoch_batch_size if self.first_epoch_batch_size and epoch == 0 else self.batch_size

    def seeded_train_loader(self, seed: int, epoch: int) -> TensorLoader:
        """The training loader of `epoch` in a one-device fit seeded `seed` (seed_everything, whose seed `setup`
        shuffles with): its batch size and order. A search's grouped probe feeds each member from its own."""
        sampler = ShardedOrder(len(self.split("train")), shuffle=True, seed=seed % 2**31)
        sampler.set_epoch(epoch)
        return TensorLoader(
            self.split("train"), self.train_batch_size(epoch), self.mean, self.std, sampler, augment=self.augment
        )

    def _sampler(self, name: str, train: bool) -> ShardedOrder:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        size = len(self.split(name))
        if not train and 0 < size < world:  # a rank with no batch skips its loop, and the others wait for it
            raise SplitSizeError(
                f"the {name} split holds {size} sample(s), fewer than the {world} DDP ranks, and evaluation repeats "
                f"none: give it at least {world} (e.g. --data.{name}_size) or run on fewer devices"
            )
        return ShardedOrder(size, shuffle=train, seed=self.shuffle_seed, rank=rank, world_size=world, pad=train)

    def _loader(self, name: str, train: bool, noise: float = 0.0, noise_seed: int = 0) -> TensorLoader:
        return TensorLoader(
            self.split(name),
            self.train_batch_size() if train else self.batch_size,
            self.mean,
            self.std,
            self._sampler(name, train),
            augment=self.augment if train else None,
            noise=noise,
            noise_seed=noise_seed,
        )

    def noise_dataloader(self, split: str, level: float, seed: int = 0) -> TensorLoader:
        """A split in evaluation order with the paper's input noise at `level` (MNIST: that fraction of
        pixels set to mean + 2 std), seeded, so every model sees the same noisy inputs."""
        return self._loader(split, train=False, noise=level, noise_seed=seed)

    def eval_dataloader(self, split: str) -> TensorLoader:
        """Any split (`train`, `val`, `test`) in evaluation order: unshuffled, unaugmented, unpadded."""
        return self._loader(split, train=False)

    def train_dataloader(self) -> TensorLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> TensorLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> TensorLoader:
        return self._loader("test", train=False)
