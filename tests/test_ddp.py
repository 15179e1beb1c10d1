"""DDP on CPU: 2 processes (gloo) through `train.py`; metrics, dead units and variances equal one process's."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, QUIET, ROOT, cli, data_args, run_train, teacher_args

# 301 validation samples: ranks hold 151 and 150, so nothing may be counted twice or dropped
EXTRA = ["--data.val_size", "301", "--trainer.callbacks+=callbacks.ActivationStats"]
TWO_CPU_RANKS = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
NO_BAR = ["--trainer.enable_progress_bar", "false"]


def saved(folder: Path, kind: str) -> dict:
    (path,) = (folder / kind).glob("step*.pt")
    return torch.load(path, weights_only=True)


def metric_rows(folder: Path) -> list[dict]:
    return list(csv.DictReader((folder / "metrics.csv").open()))


@pytest.mark.slow
def test_ddp_fit_logs_the_same_validation_metrics_as_one_process(in_tmp):
    fit = ["fit", "--config", CONFIGS / "quickstart.yaml", *EXTRA, *TWO_CPU_RANKS, *NO_BAR]
    fit += ["--trainer.max_epochs", "1", "--wandb", "false"]
    (in_tmp / "torchrun").mkdir()
    torchrun = subprocess.Popen(  # the same run launched by torchrun (Lightning then launches nothing itself)
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + [str(ROOT / "train.py"), *map(str, fit)],
        cwd=in_tmp / "torchrun",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    result = run_train(*fit, cwd=in_tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sync_dist" not in result.stderr  # metrics already reduced over ranks are logged without warnings
    folder = in_tmp / "runs" / "quickstart" / "version_0"
    rows = [r for r in metric_rows(folder) if r.get("val/acc")]
    ddp_acc, ddp_loss = float(rows[-1]["val/acc"]), float(rows[-1]["val/loss"])
    assert (folder / "config.yaml").is_file() and not (in_tmp / "runs" / "quickstart" / "version_1").exists()

    out, _ = torchrun.communicate(timeout=300)
    assert torchrun.returncode == 0, out[-3000:]
    launched = metric_rows(in_tmp / "torchrun" / "runs" / "quickstart" / "version_0")
    assert len(launched) == len(metric_rows(folder)) > 0
    for got, want in zip(launched, metric_rows(folder), strict=True):  # torchrun = Lightning's own DDP launcher
        assert {k: float(v) for k, v in got.items() if v} == pytest.approx(
            {k: float(v) for k, v in want.items() if v}, nan_ok=True
        )

    # the same weights validated by one process over the whole validation split
    single = cli(
        "validate",
        "--config",
        CONFIGS / "quickstart.yaml",
        *EXTRA,
        "--ckpt_path",
        folder / "checkpoints" / "last.ckpt",
        *QUIET,
    ).trainer.callback_metrics
    single_folder = in_tmp / "runs" / "quickstart" / "version_1"
    assert ddp_acc == pytest.approx(single["val/acc"].item(), abs=1e-7)
    assert ddp_loss == pytest.approx(single["val/loss"].item(), rel=1e-5)
    assert Path(folder / "checkpoints" / "last.ckpt").is_file()

    # dead units: each unit's peak over the split is a maximum over ranks, exact to the bit
    ddp_peaks, single_peaks = saved(folder, "dead_units"), saved(single_folder, "dead_units")
    assert ddp_peaks.keys() == single_peaks.keys() and len(ddp_peaks) == 9
    for name in ddp_peaks:
        assert torch.equal(ddp_peaks[name], single_peaks[name]), name
    assert float(rows[-1]["dead/total"]) == single["dead/total"].item()

    # activation moments merged over ranks: the same counts, means and variances as one process
    ddp_stats, single_stats = saved(folder, "activation_stats"), saved(single_folder, "activation_stats")
    assert ddp_stats["features.0"]["count"] == 301 * 28 * 28  # every position of every image, once
    for name, stats in ddp_stats.items():
        assert stats["count"] == single_stats[name]["count"], name
        # float32 batch sums, batched differently on 2 ranks: equal to float32 rounding
        assert torch.allclose(stats["mean"], single_stats[name]["mean"], rtol=1e-5, atol=1e-6), name
        assert torch.allclose(stats["var"], single_stats[name]["var"], rtol=1e-5, atol=1e-6), name


@pytest.mark.slow
def test_ddp_student_attention_transfer_equals_one_process_on_the_same_batch(in_tmp):
    """A student trains 3 steps on 2 ranks; its validation AT losses (per-device maps, averaged over ranks by
    the metrics) equal one process's on the same 16 images with the same weights. (Training steps differ:
    batch norm normalises each rank's half on its own, and SyncBatchNorm needs GPUs.)"""
    config = CONFIGS / "compression" / "mnist_student.yaml"
    args = [*data_args(config, in_tmp / "data"), *teacher_args(config, in_tmp / "teacher"), "--wandb", "false"]
    result = run_train(
        "fit",
        "--config",
        config,
        *args,
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "3",
        "--data.batch_size",
        "8",
        *TWO_CPU_RANKS,
        *NO_BAR,
        "--name",
        "ddp",
        cwd=in_tmp,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    folder = in_tmp / "runs" / "ddp" / "version_0"
    ddp = {k: float(v) for row in csv.DictReader((folder / "metrics.csv").open()) for k, v in row.items() if v}
    single = cli(
        "validate", "--config", config, *args, "--ckpt_path", folder / "checkpoints" / "last.ckpt", *QUIET[2:]
    ).trainer.callback_metrics
    for key in ("val/at_g1", "val/at_g2", "val/at_g3", "val/task", "val/loss"):
        assert ddp[key] == pytest.approx(single[key].item(), rel=1e-5), key
    assert ddp["val/at_g3"] > 0 and ddp["train/at_g3"] > 0
