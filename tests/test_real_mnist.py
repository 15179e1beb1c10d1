"""Real data: the official MNIST test file (10,000 images), when it sits beside the project."""

import pytest

from datamodules import MNIST
from tests.conftest import CONFIGS, QUIET, SHARED_MNIST, cli

pytestmark = pytest.mark.skipif(
    not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"the real MNIST 10k split is not at {SHARED_MNIST}",
)


def test_the_10k_split_loads_as_8000_train_2000_val():
    dm = MNIST(data_dir=str(SHARED_MNIST), test_file_only=True, val_size=2000, seed=0)
    dm.setup()
    assert len(dm.splits["train"]) == 8000 and len(dm.splits["val"]) == 2000
    assert sorted(dm.splits["val"].labels.unique().tolist()) == list(range(10))


@pytest.mark.slow
def test_resnet_k9_trains_below_10_percent_error_in_3_epochs(in_tmp):
    trainer = cli(
        "fit",
        "--config",
        CONFIGS / "depth" / "resnet.yaml",
        "--config",
        CONFIGS / "presets" / "mnist_10k.yaml",
        "--data.data_dir",
        SHARED_MNIST,
        "--model.init_args.net.init_args.depth",
        "9",
        *QUIET,
    ).trainer
    assert trainer.current_epoch == 3
    assert trainer.callback_metrics["val/err"].item() < 0.10
