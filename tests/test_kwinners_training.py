"""k-winners nets trained as a user runs them: the boost schedule, the first epoch's batch size, an exact resume,
and the `noise` subcommand."""

import csv
from pathlib import Path

import pytest
import torch

from lightning_modules.layers import KWinnersBase
from tests.conftest import CONFIGS, QUIET, cli, fit_quickstart, make_mnist

SPARSE = CONFIGS / "kwinners" / "mnist_sparse.yaml"


def fit_sparse(data: Path, *extra: str):
    """The paper's sparse MNIST CNN-2 on a tiny MNIST: 80 training images, 20 steps at batch 4, then 2 per epoch."""
    return cli(
        "fit",
        "--config",
        SPARSE,
        "--data.data_dir",
        data,
        "--data.download",
        "false",
        "--data.val_size",
        "16",
        *QUIET,
        *extra,
    ).trainer


def test_first_epoch_batch_size_and_boost_decay_per_epoch(in_tmp):
    trainer = fit_sparse(make_mnist(in_tmp / "data"), "--trainer.max_epochs", "3")
    assert trainer.global_step == 20 + 2 + 2
    layers = [m for m in trainer.lightning_module.net.modules() if isinstance(m, KWinnersBase)]
    assert len(layers) == 3
    for layer in layers:
        assert layer.boost_strength.item() == pytest.approx(1.5 * 0.85**2)  # set at the start of epoch 2
        assert layer.samples_seen.item() == 3 * 80


@pytest.mark.slow
def test_a_resumed_run_equals_an_uninterrupted_one(in_tmp):
    data = make_mnist(in_tmp / "data")
    whole = fit_sparse(data, "--trainer.max_epochs", "3").lightning_module.state_dict()
    first = fit_sparse(data, "--trainer.max_epochs", "1")
    last = Path(first.log_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["state_dict"]
    assert saved["net.hidden.act.samples_seen"].item() == 80  # the sample counter is in the checkpoint
    resumed = fit_sparse(data, "--trainer.max_epochs", "3", "--ckpt_path", last)
    assert resumed.global_step == 24
    state = resumed.lightning_module.state_dict()
    assert state.keys() == whole.keys()
    for name, value in whole.items():
        assert torch.equal(state[name], value), name  # duty cycles, counters, boost, weights and masks alike


@pytest.mark.slow(10)
def test_noise_subcommand_scores_each_checkpoint(in_tmp, capsys):
    runs = [fit_quickstart("--seed_everything", str(s)) for s in (0, 1)]
    checkpoints = [str(Path(t.log_dir) / "checkpoints" / "last.ckpt") for t in runs]
    cli(
        "noise",
        "--config",
        CONFIGS / "quickstart.yaml",
        "--checkpoints",
        f"[{','.join(checkpoints)}]",
        *QUIET,
        "--name",
        "noise",
    )
    folder = in_tmp / "runs" / "noise" / "version_0"
    rows = list(csv.DictReader((folder / "noise.csv").open()))
    assert len(rows) == 2 * 11 and {r["model"] for r in rows} == {"quickstart/version_0", "quickstart/version_1"}
    assert (folder / "noise.md").is_file() and (folder / "noise.png").stat().st_size > 0
    out = capsys.readouterr().out
    for checkpoint, name in zip(checkpoints, ("quickstart/version_0", "quickstart/version_1"), strict=True):
        mine = {float(r["noise"]): float(r["accuracy"]) for r in rows if r["model"] == name}
        tested = cli("test", "--config", CONFIGS / "quickstart.yaml", "--ckpt_path", checkpoint, *QUIET).trainer
        assert mine[0.0] == pytest.approx(tested.callback_metrics["test/acc"].item(), abs=1e-6)  # level 0: plain test
        assert mine[0.5] < mine[0.0] - 0.2  # half the pixels at mean + 2 std
        score = sum(int(r["correct"]) for r in rows if r["model"] == name)
        assert f"{score:,} |" in (folder / "noise.md").read_text() and f"noise score {score:,}" in out
