"""Datamodules: the real IDX loader on tiny files, clear errors, splits, sharding and batches."""

import gzip
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules import (
    MNIST,
    CorruptDataError,
    DataNotFoundError,
    Digits,
    FashionMNIST,
    NoTestSplitError,
    SplitSizeError,
)
from datamodules.mnist import read_idx
from datamodules.tensor_data import ShardedOrder, Split, TensorLoader
from lightning_modules.errors import ConfigError
from tests.conftest import make_mnist, write_idx


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = write_idx(tmp_path / "x-idx3-ubyte", array, gz=gz)
    assert torch.equal(read_idx(path), torch.from_numpy(array))


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), gz=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptDataError, match="header promises"):
        read_idx(path)
    bogus = tmp_path / "y.gz"
    bogus.write_bytes(b"not gzip at all")
    with pytest.raises(CorruptDataError, match="cannot be read"):
        read_idx(bogus)
    plain = tmp_path / "z"
    plain.write_bytes(b"\x1f\x8b\x08\x00")
    with pytest.raises(CorruptDataError, match="bad magic"):
        read_idx(plain)


def test_mnist_loads_torchvision_layout(tiny_mnist):
    dm = MNIST(data_dir=str(tiny_mnist), val_size=16, batch_size=32)
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 80, "val": 16, "test": 48}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    raw = read_idx(tiny_mnist / "MNIST" / "raw" / "train-images-idx3-ubyte.gz")
    expected_min = (0 - 0.1307) / 0.3081
    assert x.min().item() >= expected_min - 1e-5 and x.max().item() == pytest.approx((1 - 0.1307) / 0.3081, rel=1e-5)
    assert raw.shape == (96, 28, 28)


def test_mnist_reads_plain_files_directly_in_data_dir(tmp_path):
    source = make_mnist(tmp_path / "src")
    flat = tmp_path / "flat"
    flat.mkdir()
    for gz in (source / "MNIST" / "raw").iterdir():  # gunzipped, side by side, as the original download unpacks
        (flat / gz.name.removesuffix(".gz")).write_bytes(gzip.decompress(gz.read_bytes()))
    dm = MNIST(data_dir=str(flat), val_size=10)
    dm.setup()
    assert len(dm.splits["train"]) == 86


def test_test_file_only_builds_train_and_val_from_the_test_file_and_has_no_test_split(tiny_mnist):
    (tiny_mnist / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").unlink()  # not needed in this mode
    dm = MNIST(data_dir=str(tiny_mnist), test_file_only=True, val_size=8, seed=3)
    dm.setup()
    assert len(dm.splits["train"]) == 40 and len(dm.splits["val"]) == 8 and "test" not in dm.splits
    again = MNIST(data_dir=str(tiny_mnist), test_file_only=True, val_size=8, seed=3)
    again.setup()
    assert torch.equal(again.splits["val"].labels, dm.splits["val"].labels)  # the split is seeded
    for ask in (dm.test_dataloader, lambda: dm.eval_dataloader("test"), lambda: dm.noise_dataloader("test", 0.1)):
        with pytest.raises(NoTestSplitError, match=r"--data.test_size N .*mnist_10k.yaml holds out 1,000"):
            ask()  # never the validation images under the name "test"


def test_an_evaluation_split_smaller_than_the_ranks_is_refused_in_one_line(tiny_mnist):
    """Evaluation repeats no sample, so a rank past the split's size would have no batch: Lightning skips its loop
    and the other ranks wait for it in every collective (DDP hangs). Refused before any loop starts."""
    dm = MNIST(data_dir=str(tiny_mnist), val_size=1)
    dm.setup()
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2, current_epoch=0)
    with pytest.raises(SplitSizeError, match=r"the val split holds 1 sample\(s\), fewer than the 2 DDP ranks"):
        dm.val_dataloader()
    assert len(dm.train_dataloader().sampler) == len(dm.splits["train"]) // 2 + len(dm.splits["train"]) % 2
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0)
    assert len(dm.val_dataloader().sampler) == 1  # one process: one sample is enough


def test_a_held_out_test_split_is_disjoint_seeded_and_leaves_training_as_it_was(tiny_mnist):
    def images(dm, name):
        return {bytes(x.numpy()) for x in dm.splits[name].images}

    before = MNIST(data_dir=str(tiny_mnist), test_file_only=True, val_size=16, seed=3)
    held = MNIST(data_dir=str(tiny_mnist), test_file_only=True, val_size=8, test_size=8, seed=3)
    before.setup()
    held.setup()
    assert [len(held.splits[n]) for n in ("train", "val", "test")] == [32, 8, 8]
    assert not images(held, "test") & (images(held, "val") | images(held, "train"))
    assert not images(held, "val") & images(held, "train")
    # the first val_size + test_size of the seeded order: the same training images as 16 validation ones gave
    assert torch.equal(held.splits["train"].images, before.splits["train"].images)
    assert images(held, "val") | images(held, "test") == images(before, "val")
    again = MNIST(data_dir=str(tiny_mnist), test_file_only=True, val_size=8, test_size=8, seed=3)
    again.setup()
    assert torch.equal(again.splits["test"].images, held.splits["test"].images)
    other = MNIST(data_dir=str(tiny_mnist), test_file_only=True, val_size=8, test_size=8, seed=4)
    other.setup()
    assert not torch.equal(other.splits["test"].images, held.splits["test"].images)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"test_file_only": False, "test_size": 8}, "has an official test split"),
        (
            {"test_file_only": True, "val_size": 24, "test_size": 24},
            "and test_size=24 together must be between 1 and 47",
        ),
    ],
)
def test_test_sizes_that_cannot_work_are_refused(tiny_mnist, settings, message):
    with pytest.raises(SplitSizeError, match=message):
        MNIST(data_dir=str(tiny_mnist), **{"val_size": 8, **settings}).setup()
    with pytest.raises(ConfigError, match="test_size must be 0 or more, got -1"):
        MNIST(data_dir=str(tiny_mnist), test_file_only=True, test_size=-1)


def test_fashion_mnist_uses_its_own_folder(tmp_path):
    make_mnist(tmp_path, folder="FashionMNIST")
    dm = FashionMNIST(data_dir=str(tmp_path), val_size=8)
    dm.setup()
    assert len(dm.splits["train"]) == 88
    with pytest.raises(DataNotFoundError):
        MNIST(data_dir=str(tmp_path)).setup()


def test_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        MNIST(data_dir=str(tmp_path / "nowhere")).setup()
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message and "train-images-idx3-ubyte" in message


def test_download_failure_is_the_same_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)  # the network, not the loader, is what fails here
    with pytest.raises(DataNotFoundError, match="download failed"):
        MNIST(data_dir=str(tmp_path), download=True).prepare_data()


def test_digits_look_like_mnist():
    dm = Digits(val_size=300)
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 1200, "val": 300, "test": 297}
    images = dm.splits["train"].images
    assert images.shape[1:] == (1, 28, 28) and images.dtype == torch.uint8
    assert images[:, :, :4].max() == 0 and images[:, :, -4:].max() == 0  # a 20x20 digit centred in 28x28, as MNIST


@pytest.mark.parametrize("size,world", [(10, 3), (9, 3), (7, 2), (5, 4)])
def test_eval_sharding_covers_every_sample_exactly_once(size, world):
    shards = [
        ShardedOrder(size, shuffle=False, seed=0, rank=r, world_size=world, pad=False).indices() for r in range(world)
    ]
    assert sorted(torch.cat(shards).tolist()) == list(range(size))


@pytest.mark.parametrize("size,world", [(10, 3), (7, 2)])
def test_train_sharding_pads_like_distributed_sampler(size, world):
    shards = [ShardedOrder(size, shuffle=True, seed=5, rank=r, world_size=world, pad=True) for r in range(world)]
    for shard in shards:
        shard.set_epoch(2)
    indices = [s.indices() for s in shards]
    assert len({len(i) for i in indices}) == 1  # every rank the same count: no rank waits in all-reduce
    assert set(torch.cat(indices).tolist()) == set(range(size))


def test_shuffle_changes_with_epoch_and_repeats_with_seed():
    order = ShardedOrder(100, shuffle=True, seed=1)
    first = order.indices()
    order.set_epoch(1)
    assert not torch.equal(first, order.indices())
    order.set_epoch(0)
    assert torch.equal(first, order.indices())


def test_loader_batches_are_index_slices_normalised():
    images = torch.arange(6 * 4, dtype=torch.uint8).view(6, 1, 2, 2)
    split = Split(images, torch.arange(6))
    loader = TensorLoader(split, 4, mean=(0.5,), std=(0.25,), sampler=ShardedOrder(6, shuffle=False, seed=0))
    batches = list(loader)
    assert len(loader) == 2 and [len(y) for _, y in batches] == [4, 2]
    torch.testing.assert_close(batches[1][0], (images[4:].float() / 255 - 0.5) / 0.25)


def test_a_loader_restored_mid_pass_hands_out_exactly_the_rest_of_that_pass():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    split = Split(images, torch.arange(10))

    def loader() -> TensorLoader:
        order = ShardedOrder(10, shuffle=True, seed=3)
        order.set_epoch(2)
        return TensorLoader(split, 3, mean=(0.0,), std=(1 / 255,), sampler=order)

    whole = [labels.tolist() for _, labels in loader()]
    first = loader()
    batches = iter(first)
    seen = [next(batches)[1].tolist() for _ in range(2)]
    state = first.state_dict()
    assert state == {"batches": 2}
    resumed = loader()
    resumed.load_state_dict(state)
    assert seen + [labels.tolist() for _, labels in resumed] == whole  # the rest, then a whole pass again
    assert [labels.tolist() for _, labels in resumed] == whole and resumed.state_dict() == {"batches": 0}
