"""MNIST and FashionMNIST from the official IDX files, held in memory as tensors.

Files are looked up where torchvision puts them (`<data_dir>/MNIST/raw/`) and directly in
`data_dir`, gzipped or not, so a folder of the four original downloads works as it is.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from datamodules.tensor_data import CorruptDataError, DataNotFoundError, Split, TensorDataModule, download_failure

IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Path) -> torch.Tensor:
    """Read one IDX file (optionally gzipped) into a tensor, checking its header against its size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise CorruptDataError(f"{path}: cannot be read ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise CorruptDataError(f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise CorruptDataError(f"{path}: header promises {shape} ({expected} bytes) but the file has {len(data)} bytes")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


class MNIST(TensorDataModule):
    """MNIST digits, 1x28x28, from the official IDX files."""

    folder = "MNIST"
    mean, std = (0.1307,), (0.3081,)
    num_classes = 10
    input_shape = (1, 28, 28)
    files = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        test_file_only: bool = False,
        batch_size: int = 256,
        val_size: int = 5000,
        test_size: int = 0,
        seed: int = 0,
        on_device: bool = True,
        first_epoch_batch_size: int | None = None,
    ):
        """
        Args:
            data_dir: folder holding `<folder>/raw/*-ubyte[.gz]` (torchvision's layout) or the files themselves.
            download: fetch the files with torchvision when they are missing.
            test_file_only: build every split from the official test file alone (the 10k split); there is
                then no test split unless `test_size` holds one out.
            batch_size: samples per batch, per device.
            val_size: samples held out of the training pool for validation.
            test_size: with `test_file_only`: samples of the test file held out as the test split, disjoint
                from train and validation (configs/presets/mnist_10k.yaml: 1,000).
            seed: seed of the train/validation/test split.
            on_device: keep the data on the training device (GPU) instead of host memory.
            first_epoch_batch_size: a different training batch size for the first epoch only (the paper's
                sparse MNIST nets: 4).
        """
        super().__init__(batch_size, val_size, seed, on_device, first_epoch_batch_size, test_size=test_size)
        self.data_dir, self.download, self.test_file_only = Path(data_dir), download, test_file_only

    def no_test_split(self) -> str:
        return (
            f"{self.folder} with test_file_only: true has no test split: every image of the test file trains or "
            f"validates. Hold some out with --data.test_size N (configs/presets/mnist_10k.yaml holds out 1,000), "
            f"or use the full {self.folder} files"
        )

    def _needed(self) -> list[str]:
        splits = ["test"] if self.test_file_only else ["train", "test"]
        return [name for split in splits for name in self.files[split]]

    def _find(self, name: str) -> Path | None:
        for folder in (self.data_dir / self.folder / "raw", self.data_dir):
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
        return None

    def prepare_data(self) -> None:
        missing = [name for name in self._needed() if self._find(name) is None]
        if not missing:
            return
        where = self.data_dir / self.folder / "raw"
        hint = (
            f"{self.folder} files missing: {', '.join(missing)}. Put the official *-ubyte.gz files in {where}/ "
            f"(or set --data.data_dir)"
        )
        if not self.download:
            raise DataNotFoundError(f"{hint}, or set --data.download true to fetch them.")
        import torchvision.datasets

        try:
            getattr(torchvision.datasets, self.folder)(str(self.data_dir), train=not self.test_file_only, download=True)
            getattr(torchvision.datasets, self.folder)(str(self.data_dir), train=False, download=True)
        except Exception as e:  # torchvision raises RuntimeError/URLError/OSError depending on what failed
            raise DataNotFoundError(f"{hint}; {download_failure(e)}.") from e

    def _read(self, split: str) -> Split:
        images_name, labels_name = self.files[split]
        paths = [self._find(images_name), self._find(labels_name)]
        if None in paths:
            self.prepare_data()  # raises the clear error (setup can run without prepare_data, e.g. in a notebook)
            paths = [self._find(images_name), self._find(labels_name)]
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.dim() != 3 or images.dtype != torch.uint8:
            raise CorruptDataError(
                f"{paths[0]}: expected uint8 images (N, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if labels.dim() != 1:
            raise CorruptDataError(f"{paths[1]}: expected labels (N,), got {tuple(labels.shape)}")
        return Split(images.unsqueeze(1), labels.long())

    def load(self) -> tuple[Split, Split | None]:
        if self.test_file_only:
            return self._read("test"), None
        return self._read("train"), self._read("test")


class FashionMNIST(MNIST):
    """Fashion-MNIST, 1x28x28, same IDX files and layout as MNIST."""

    folder = "FashionMNIST"
    mean, std = (0.2860,), (0.3530,)
