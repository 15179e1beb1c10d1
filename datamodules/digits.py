"""scikit-learn's handwritten digits as a drop-in MNIST: needs no download, ships with scikit-learn.

The 1,797 8x8 images (values 0-16) are resized to 20x20 and centred in 28x28, as MNIST digits
are, then normalised with MNIST's mean and std, so every MNIST config runs on it unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from datamodules.tensor_data import Split, TensorDataModule

TEST_SIZE = 297  # the last 297 images: a fixed test split, the rest is the training pool


class Digits(TensorDataModule):
    """The embedded default dataset: sklearn digits shaped and normalised like MNIST (1x28x28)."""

    mean, std = (0.1307,), (0.3081,)
    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(
        self,
        batch_size: int = 256,
        val_size: int = 300,
        seed: int = 0,
        on_device: bool = True,
        first_epoch_batch_size: int | None = None,
    ):
        """
        Args:
            batch_size: samples per batch, per device.
            val_size: samples held out of the 1,500-image training pool for validation.
            seed: seed of the train/validation split.
            on_device: keep the data on the training device (GPU) instead of host memory.
            first_epoch_batch_size: a different training batch size for the first epoch only.
        """
        super().__init__(batch_size, val_size, seed, on_device, first_epoch_batch_size)

    def load(self) -> tuple[Split, Split | None]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False)
        images = F.pad(images, (4, 4, 4, 4))
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        labels = torch.tensor(digits.target, dtype=torch.long)
        split = len(labels) - TEST_SIZE
        return Split(images[:split], labels[:split]), Split(images[split:], labels[split:])
