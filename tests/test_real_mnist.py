"""Real data: the official MNIST test file (10,000 images), when it sits beside the project."""

import csv
from functools import partial
from pathlib import Path

import pytest
import torch

from datamodules import MNIST
from lightning_modules import LearnedSize
from lightning_modules.nets import MLP
from lightning_modules.studies.seed_stack import SeedStack
from tests.conftest import CONFIGS, QUIET, SHARED_MNIST, cli

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(
        not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
        reason=f"the real MNIST 10k split is not at {SHARED_MNIST}",
    ),
]


def test_the_10k_split_loads_as_8000_train_2000_val():
    dm = MNIST(data_dir=str(SHARED_MNIST), test_file_only=True, val_size=2000, seed=0)
    dm.setup()
    assert len(dm.splits["train"]) == 8000 and len(dm.splits["val"]) == 2000
    assert sorted(dm.splits["val"].labels.unique().tolist()) == list(range(10))


@pytest.mark.slow(18)
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
        "fan_in",  # He init: SGD learns within 2 epochs, so both nets reach about the same accuracy
        "--trainer.callbacks=[{class_path: callbacks.DeadUnits}]",  # the dead units only, not every statistic
        *QUIET,
    ).trainer.callback_metrics
    return metrics["dead/total"].item(), metrics["val/acc"].item()


@pytest.mark.slow(143)
def test_adam_leaves_more_dead_units_than_sgd_at_the_same_accuracy(in_tmp):
    adam_dead, adam_acc = dead_after("adam", 2)  # 2 epochs: 130 against 86 dead units at 0.977 and 0.953 (seed 0)
    sgd_dead, sgd_acc = dead_after("sgd", 2)
    assert adam_acc > 0.93 and sgd_acc > 0.93 and abs(adam_acc - sgd_acc) < 0.03
    assert adam_dead > 1.3 * sgd_dead, (adam_dead, sgd_dead)


@pytest.mark.slow(73)
def test_most_units_recycling_revives_are_dead_again_a_few_dozen_steps_later(in_tmp):
    """ReDo (configs/presets/redo.yaml, an event every 50 steps) on the Adam VGG run, 2 epochs: the final check
    comes 26 steps after the last event, and by then most of that event's units are dead again on the validation
    split (60 of 65 in seed 0; 74-94% in seeds 0-2 of 3-epoch runs, 39 steps after; 80-98% at every check 26-89
    steps after an event of the 10-epoch runs of docs/results/dead-units.md). The dead count is not pinned: with those units counted apart ReDo ends with more
    dead units than without in every seed of the 10-epoch runs, but not in the 3-epoch ones."""
    trainer = cli(
        "fit", "--config", CONFIGS / "dead_units" / "mnist_vgg_adam.yaml", "--config", CONFIGS / "presets" / "redo.yaml",
        "--model.init_args.recycle.every_n_steps", "50", "--data.data_dir", SHARED_MNIST, "--trainer.max_epochs", "2",
        "--trainer.callbacks=[{class_path: callbacks.DeadUnits}]", *QUIET,
    ).trainer  # fmt: skip
    last = trainer.lightning_module.recycler.events[-1]
    assert [e["step"] for e in trainer.lightning_module.recycler.events] == [50, 100]
    final = sorted((Path(trainer.log_dir) / "dead_units").glob("step*.pt"))[-1]  # the check after step 126
    peaks = torch.load(final, weights_only=True)
    recycled = sum(len(units) for units in last["units"].values())
    alive = sum(int((peaks[layer][units] > 0).sum()) for layer, units in last["units"].items())
    assert trainer.callback_metrics["recycle/total/fresh"].item() == recycled > 50  # logged apart at the check
    assert alive < 0.5 * recycled, (alive, recycled)


def size_runs(makers, penalties, epochs: int, size_lr: float) -> list[float]:
    """Final sizes of nets trained as one stack on the 10k split: Adam, lr 1e-3, the size parameters' lr `size_lr`."""
    data = MNIST(data_dir=str(SHARED_MNIST), test_file_only=True, val_size=2000, seed=0, batch_size=64)
    data.setup("fit")
    model = LearnedSize(
        MLP(8),
        optimizer=partial(torch.optim.Adam, lr=1e-3),
        param_groups={"*.x0": {"lr": size_lr}, "*.liveness": {"lr": size_lr}},
    )
    stack = SeedStack.build(makers, [0])
    records = stack.fit(data, epochs, model.build_optimizer, penalty=penalties)
    return records[-1].sizes["hidden"]


@pytest.mark.slow(17)
def test_flexible_sizes_started_apart_end_closer_together():
    starts = [32.0, 128.0, 512.0]
    makers = [partial(MLP, 1024, "flexible", start_size=s) for s in starts]
    final = size_runs(makers, 0.003, epochs=4, size_lr=1.0)  # flexible.yaml's settings
    assert max(final) - min(final) < 0.5 * (max(starts) - min(starts)), final


@pytest.mark.slow(7)
def test_sparsifier_final_size_falls_as_the_penalty_rises():
    penalties = [0.001, 0.01, 0.03]
    # sparsifier.yaml's liveness lr is 1e-3 over 60 epochs; 1e-2 shows the same direction in 3
    final = size_runs([partial(MLP, 500, "sparsifier")] * 3, penalties, epochs=3, size_lr=0.01)
    assert final[0] > final[1] > final[2], final


@pytest.mark.slow(74)
def test_sparse_cnn2_is_more_robust_to_noise_than_dense(in_tmp):
    """The direction that held in every seed of docs/results/kwinners.md's runs (10 and 15 epochs, and 2 and 3 epochs):
    the paper's sparse CNN-2 scores higher under noise than the dense one. Here 2 epochs of each, seed 0."""
    data = ["--config", CONFIGS / "presets" / "mnist_10k.yaml", "--data.data_dir", SHARED_MNIST]
    checkpoints = []
    for net in ("mnist_dense", "mnist_sparse"):
        trainer = cli(
            "fit", "--config", CONFIGS / "kwinners" / f"{net}.yaml", *data, "--trainer.max_epochs", "2", *QUIET
        ).trainer
        checkpoints.append(f"{trainer.log_dir}/checkpoints/last.ckpt")
    cli(
        "noise",
        "--config",
        CONFIGS / "kwinners" / "mnist_sparse.yaml",
        *data,
        "--checkpoints",
        f"[{','.join(checkpoints)}]",
        "--name",
        "noise",
        *QUIET,
    )
    rows = list(csv.DictReader((in_tmp / "runs" / "noise" / "version_0" / "noise.csv").open()))
    score = {net: sum(int(r["correct"]) for r in rows if net in r["model"]) for net in ("dense", "sparse")}
    at_half = {
        net: float(r["accuracy"])
        for r in rows
        if r["noise"] == "0.5"
        for net in ("dense", "sparse")
        if net in r["model"]
    }
    assert score["sparse"] > score["dense"] and at_half["sparse"] > at_half["dense"]


@pytest.mark.slow(51)
def test_under_adam_plain_backprop_learns_later_permuted_tasks_worse_and_l2_init_does_not(in_tmp):
    """Permuted MNIST, 20 tasks of one pass (docs/results/plasticity.md, where this held in all 3 seeds): under Adam
    the online accuracy of the last 3 tasks is below the first 3's without an intervention, and L2 Init loses less."""
    cli(
        "plasticity", "--config", CONFIGS / "plasticity" / "permuted_mnist.yaml",
        "--data.init_args.data.init_args.data_dir", str(SHARED_MNIST), "--data.init_args.tasks", "20",
        "--trainer.max_steps", "2500", "--model.init_args.optimizer", "torch.optim.Adam",
        "--model.init_args.optimizer.lr", "0.001", "--interventions", "{none: {}, l2_init: {l2_init: 0.001}}",
        "--seeds", "1", *QUIET,
    )  # fmt: skip
    rows = list(csv.DictReader(next((in_tmp / "runs").rglob("results.csv")).open()))

    def change(name: str) -> float:
        online = {int(r["task"]): float(r["acc_online"]) for r in rows if r["intervention"] == name}
        return sum(online[t] for t in (17, 18, 19)) / 3 - sum(online[t] for t in (0, 1, 2)) / 3

    assert change("none") < 0 and change("l2_init") > change("none")
