"""CIFAR-10 from the official python batches (`cifar-10-batches-py`), held in memory as tensors.

The batches are pickles. They are read with an unpickler that builds only dicts, lists, bytes and
numpy arrays, so a tampered file cannot run code: it is refused as corrupt.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from datamodules.augment import BatchAugment
from datamodules.tensor_data import CorruptDataError, DataNotFoundError, Split, TensorDataModule, download_failure

FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"


def _numpy_reconstruct():
    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; any other global is refused."""

    allowed = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: __import__("codecs").encode,  # bytes pickled by Python 3 at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return self.allowed[(module, name)]()


def read_batch(path: Path) -> Split:
    """Read one CIFAR-10 python batch (a pickled dict with `data` (N, 3072) uint8 and `labels`)."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as e:  # a truncated or foreign file fails in many ways inside pickle
        raise CorruptDataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise CorruptDataError(f"{path}: not a CIFAR-10 python batch (holds a {type(batch).__name__})")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise CorruptDataError(f"{path}: expected `data` as uint8 (N, 3072)")
    if labels is None or len(labels) != len(data):
        raise CorruptDataError(f"{path}: expected {len(data)} `labels`")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return Split(images, torch.as_tensor(np.asarray(labels), dtype=torch.int64))


class CIFAR10(TensorDataModule):
    """CIFAR-10, 3x32x32, 50,000 training and 10,000 test images; augmentation on tensors, on the device."""

    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    num_classes = 10
    input_shape = (3, 32, 32)

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
        cutout: int = 0,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        on_device: bool = True,
    ):
        """
        Args:
            data_dir: folder holding `cifar-10-batches-py/` (or `cifar-10-python.tar.gz`, unpacked on first use).
            download: fetch the archive with torchvision when the batches are missing.
            crop_padding: random crop after zero padding of this many pixels (the common choice: 4); 0 = off.
            flip: random horizontal flips.
            cutout: side of a random square zeroed per training image (the common choice: 16); 0 = off.
            batch_size: samples per batch, per device.
            val_size: samples held out of the 50,000 training images for validation.
            seed: seed of the train/validation split.
            on_device: keep the data on the training device (GPU) instead of host memory.
        """
        super().__init__(batch_size=batch_size, val_size=val_size, seed=seed, on_device=on_device)
        self.data_dir, self.download = Path(data_dir), download
        self.augment = BatchAugment(
            crop_padding, flip, cutout, fill=tuple(-m / s for m, s in zip(self.mean, self.std, strict=True))
        )

    @property
    def folder(self) -> Path:
        return self.data_dir / FOLDER

    def _missing(self) -> list[str]:
        return [name for name in (*TRAIN_FILES, TEST_FILE) if not (self.folder / name).is_file()]

    def prepare_data(self) -> None:
        if not self._missing():
            return
        archive = self.data_dir / ARCHIVE
        if archive.is_file():
            try:
                with tarfile.open(archive) as tar:
                    tar.extractall(self.data_dir, filter="data")
            except (tarfile.TarError, OSError, EOFError) as e:
                raise CorruptDataError(f"{archive}: cannot be unpacked ({e})") from e
            if not self._missing():
                return
        hint = (
            f"CIFAR-10 files missing: {', '.join(self._missing())}. Put the official python batches in "
            f"{self.folder}/ (or {ARCHIVE} in {self.data_dir}/, or set --data.data_dir)"
        )
        if not self.download:
            raise DataNotFoundError(f"{hint}, or set --data.download true to fetch them.")
        import torchvision.datasets

        try:
            torchvision.datasets.CIFAR10(str(self.data_dir), download=True)
        except Exception as e:  # torchvision raises RuntimeError/URLError/OSError depending on what failed
            raise DataNotFoundError(f"{hint}; {download_failure(e)}.") from e

    def load(self) -> tuple[Split, Split | None]:
        if self._missing():
            self.prepare_data()  # raises the clear error (setup can run without prepare_data, e.g. in a notebook)
        parts = [read_batch(self.folder / name) for name in TRAIN_FILES]
        train = Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))
        return train, read_batch(self.folder / TEST_FILE)
