"""CIFAR-10 from tiny files in the official python-batch format, and the tensor augmentations."""

import pickle
import tarfile

import numpy as np
import pytest
import torch

from datamodules import CIFAR10, BatchAugment, CorruptDataError, DataNotFoundError
from datamodules.cifar10 import read_batch
from tests.conftest import make_cifar10


def test_reads_the_official_batches_into_tensors(tiny_cifar10):
    data = CIFAR10(str(tiny_cifar10), val_size=10, batch_size=7)
    data.setup("fit")
    assert len(data.splits["train"]) == 90 and len(data.splits["val"]) == 10 and len(data.splits["test"]) == 40
    with open(tiny_cifar10 / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    test = data.splits["test"]
    # row-major (3, 32, 32) per image, exactly as stored
    assert torch.equal(test.images[3], torch.from_numpy(raw[b"data"][3].reshape(3, 32, 32)))
    assert test.labels.tolist() == raw[b"labels"]
    x, y = next(iter(data.val_dataloader()))
    assert x.shape == (7, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_missing_batches_say_where_to_put_them(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"cifar-10-batches-py"):
        CIFAR10(str(tmp_path)).prepare_data()


def test_the_archive_is_unpacked_on_first_use(tmp_path):
    source = make_cifar10(tmp_path / "source")
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    data = CIFAR10(str(tmp_path / "data"), val_size=10)
    data.prepare_data()
    data.setup("fit")
    assert len(data.splits["test"]) == 40


def test_truncated_batch_is_a_corrupt_data_error(tiny_cifar10):
    path = tiny_cifar10 / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CorruptDataError, match="data_batch_2"):
        CIFAR10(str(tiny_cifar10), val_size=10).setup("fit")


class RunsCode:
    def __reduce__(self):  # `operator.call`-like: any callable would do; this one is never patched (Ray patches print)
        return (exec, ("print('this must never run')",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": RunsCode(), b"labels": []}, protocol=2))
    with pytest.raises(CorruptDataError, match=r"refusing to load (__builtin__|builtins)\.exec"):
        read_batch(path)
    assert "must never run" not in capsys.readouterr().out


def test_flip_mirrors_about_half_of_the_images():
    torch.manual_seed(0)
    x = torch.randn(100, 3, 8, 8)
    out = BatchAugment(flip=True)(x)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert torch.all(same ^ mirrored) and 30 < mirrored.sum() < 70


def test_random_crop_shifts_each_image_as_a_whole_over_every_offset():
    torch.manual_seed(0)
    p, fill = 2, (-1.0, -2.0, -3.0)
    x = torch.randn(1, 3, 8, 8).repeat(300, 1, 1, 1)
    out = BatchAugment(crop_padding=p, fill=fill)(x)
    padded = torch.stack([torch.nn.functional.pad(x[0, c], (p, p, p, p), value=fill[c]) for c in range(3)])
    offsets = []
    for image in out:
        found = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(padded[:, dy : dy + 8, dx : dx + 8], image)
        ]
        assert len(found) == 1
        offsets += found
    assert len(set(offsets)) == (2 * p + 1) ** 2


def test_cutout_zeroes_one_square_per_image():
    torch.manual_seed(0)
    x = torch.ones(64, 3, 16, 16)
    out = BatchAugment(cutout=6)(x)
    zeroed = out[:, 0] == 0
    assert torch.equal(zeroed, (out == 0).all(1))  # all channels together
    areas = zeroed.flatten(1).sum(1)
    assert areas.max() == 36 and areas.min() >= 9  # a full 6x6 square, or one clipped by the border
    rows, cols = zeroed.any(2), zeroed.any(1)
    assert torch.all(rows.sum(1) * cols.sum(1) == areas)  # a rectangle, not scattered pixels


def test_training_batches_are_augmented_and_evaluation_batches_are_not(tiny_cifar10):
    torch.manual_seed(0)
    data = CIFAR10(str(tiny_cifar10), val_size=10, batch_size=90, flip=True, crop_padding=4)
    data.setup("fit")
    train = next(iter(data.train_dataloader()))[0]
    plain = next(iter(data.eval_dataloader("train")))[0]
    assert train.shape == plain.shape
    assert not torch.equal(train.sort(0).values, plain.sort(0).values)
    assert torch.equal(next(iter(data.eval_dataloader("train")))[0], plain)  # evaluation order is fixed
    black = (torch.zeros(3) - torch.tensor(data.mean)) / torch.tensor(data.std)
    assert np.allclose(data.augment.fill, black.tolist())
