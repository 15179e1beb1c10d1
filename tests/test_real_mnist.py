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


def dead_after(optimiser: str, epochs: int) -> tuple[float, float]:
    metrics = cli(
        "fit",
        "--config",
        CONFIGS / "dead_units" / f"mnist_vgg_{optimiser}.yaml",
        "--data.data_dir",
        SHARED_MNIST,
        "--trainer.max_epochs",
        epochs,
        "--model.init_args.net.init_args.init",
        "fan_in",  # He init: SGD learns within 3 epochs, so both nets reach the same accuracy
        *QUIET,
    ).trainer.callback_metrics
    return metrics["dead/total"].item(), metrics["val/acc"].item()


@pytest.mark.slow
def test_adam_leaves_more_dead_units_than_sgd_at_the_same_accuracy(in_tmp):
    adam_dead, adam_acc = dead_after("adam", 3)
    sgd_dead, sgd_acc = dead_after("sgd", 3)
    assert adam_acc > 0.93 and sgd_acc > 0.93 and abs(adam_acc - sgd_acc) < 0.03
    assert adam_dead > 1.3 * sgd_dead, (adam_dead, sgd_dead)
