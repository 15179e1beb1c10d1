"""ImageNet (or any dataset in ImageFolder layout) streamed from disk with the standard augmentation.

`root/train/<class>/*.JPEG` and `root/val/<class>/*.JPEG`: the layout of torchvision's ImageFolder,
with ImageNet's validation images sorted into class folders. Too big to hold in memory, so unlike
the small datasets this one decodes per sample in worker processes: random-resized crop and flip
for training, resize and centre crop for validation and test, all normalised with ImageNet's statistics.
Under DDP every validation and test image is counted once (no padding by repeated samples).
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from datamodules.tensor_data import CorruptDataError, DataError, DataNotFoundError, NoTestSplitError
from lightning_modules.errors import require

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_rgb(path: str) -> Image.Image:
    """Decode one image as RGB; an unreadable file is a CorruptDataError naming it."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise CorruptDataError(f"{path}: not a readable image ({e})") from e


class ImageFolderData(pl.LightningDataModule):
    """Train/val image folders (ImageNet by default sizes), batches of decoded, augmented images."""

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
        image_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 8,
    ):
        """
        Args:
            data_dir: the folder holding `train_dir` and `val_dir`, each with one sub-folder per class.
            train_dir: training images, under data_dir.
            val_dir: validation images, under data_dir, in class folders like the training ones.
            test_dir: test images, under data_dir, in class folders, never used to validate (ImageNet's own
                test labels are not public: without it `test` refuses rather than test on `val_dir`).
            image_size: side of the square crops fed to the net (evaluation resizes to 8/7 of it first).
            batch_size: images per batch, per device.
            num_workers: decoding processes per device.
        """
        require("positive", image_size=image_size, batch_size=batch_size)
        require("non_negative", num_workers=num_workers)
        super().__init__()
        self.root = Path(data_dir)
        self.dirs = {"train": self.root / train_dir, "val": self.root / val_dir}
        if test_dir is not None:
            self.dirs["test"] = self.root / test_dir
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.input_shape = (3, image_size, image_size)
        self.splits: dict[str, datasets.ImageFolder] = {}

    def transform(self, train: bool) -> transforms.Compose:
        size = self.image_size
        if train:
            steps = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
        else:
            steps = [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)]
        return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    def setup(self, stage: str | None = None) -> None:
        for split, folder in self.dirs.items():
            if not folder.is_dir():
                raise DataNotFoundError(
                    f"no {split} images at {folder}: put ImageNet (or any ImageFolder dataset) in "
                    f"{self.root}/train/<class>/*.JPEG and {self.root}/val/<class>/*.JPEG, or set --data.data_dir"
                )
            try:
                self.splits[split] = datasets.ImageFolder(
                    str(folder), self.transform(split == "train"), loader=load_rgb
                )
            except FileNotFoundError as e:  # no class folders, or no images in them
                raise DataNotFoundError(f"{folder}: {e}") from e
        train = self.splits["train"]
        for split, images in self.splits.items():
            if images.classes != train.classes:
                raise DataError(
                    f"{self.dirs[split]} has {len(images.classes)} class folders and {self.dirs['train']} "
                    f"{len(train.classes)}: they must be the same classes"
                )
        self.num_classes = len(train.classes)

    def loader(self, split: str) -> DataLoader:
        if split not in self.splits:
            raise NoTestSplitError(
                f"no test images: set --data.test_dir to a folder of class folders under {self.root} that no run "
                f"validates on ({self.dirs['val']} validates)"
            )
        dataset, train = self.splits[split], split == "train"
        trainer, sampler = self.trainer, None
        if not train and trainer is not None and trainer.world_size > 1:  # each image once over the ranks
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=train,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")
