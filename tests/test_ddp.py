"""DDP on CPU: 2 processes (gloo) through `train.py`, metrics synced over ranks."""

import csv
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, QUIET, cli
from tests.test_cli import run_train


@pytest.mark.slow
def test_ddp_fit_logs_the_same_validation_metrics_as_one_process(in_tmp):
    result = run_train(
        "fit",
        "--config",
        CONFIGS / "quickstart.yaml",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_epochs",
        "1",
        "--wandb",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        cwd=in_tmp,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    folder = in_tmp / "runs" / "quickstart" / "version_0"
    rows = [r for r in csv.DictReader((folder / "metrics.csv").open()) if r.get("val/acc")]
    ddp_acc, ddp_loss = float(rows[-1]["val/acc"]), float(rows[-1]["val/loss"])
    assert (folder / "config.yaml").is_file() and not (in_tmp / "runs" / "quickstart" / "version_1").exists()

    # the same weights validated by one process over the whole validation split
    single = cli(
        "validate", "--config", CONFIGS / "quickstart.yaml", "--ckpt_path", folder / "checkpoints" / "last.ckpt", *QUIET
    ).trainer.callback_metrics
    # 300 validation samples split 150/150 with no padding: synced counts equal one process's exactly
    assert ddp_acc == pytest.approx(single["val/acc"].item(), abs=1e-7)
    assert ddp_loss == pytest.approx(single["val/loss"].item(), rel=1e-5)
    assert Path(folder / "checkpoints" / "last.ckpt").is_file()
