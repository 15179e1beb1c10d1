"""DDP on CPU as a user runs it: 2 ranks (gloo) with W&B on (offline) and the configs' callbacks, through `fit`
(Lightning's launcher and torchrun), `validate` and `test`. Every run has a time limit that turns a hang into a
failure saying so, and what the ranks count together equals what one process counts."""

import csv
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    CONFIGS,
    QUIET,
    TORCHRUN,
    cli,
    data_args,
    fit_quickstart,
    run_train,
    teacher_args,
)

QUICKSTART = CONFIGS / "quickstart.yaml"
# 301 validation samples: ranks hold 151 and 150, so nothing may be counted twice or dropped
EXTRA = ["--data.val_size", "301", "--trainer.callbacks+=callbacks.ActivationStats"]
TWO_CPU_RANKS = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
NO_BAR = ["--trainer.enable_progress_bar", "false"]
# the single-process reference runs in this test's process and computes the counts the DDP runs are held to:
# W&B plays no part in them, so it stays off there (each DDP run below logs to W&B)
REFERENCE = [*QUIET]


def saved(folder: Path, kind: str) -> dict:
    """A callback's statistics of its last observation."""
    return torch.load(sorted((folder / kind).glob("step*.pt"))[-1], weights_only=True)


def metric_rows(folder: Path) -> list[dict]:
    return list(csv.DictReader((folder / "metrics.csv").open()))


def wandb_run_of(folder: Path, cwd: Path) -> Path:
    """The offline W&B run of a run folder (the one its `wandb_run_id` names), which must exist once."""
    run_id = (folder / "wandb_run_id").read_text().strip()
    (run,) = (cwd / "wandb").glob(f"offline-run-*-{run_id}")
    assert list(run.glob("run-*.wandb")), run
    return run


def media(run: Path) -> set[str]:
    return {p.relative_to(run / "files" / "media").as_posix() for p in (run / "files" / "media").rglob("*.*")}


@pytest.mark.slow(55)
@pytest.mark.subprocess
def test_ddp_fit_with_wandb_and_the_callbacks_finishes_and_counts_as_one_process(in_tmp, launch):
    """The README's DDP command, defaults on: 2 epochs with validation, checkpoints, DeadUnits (the quickstart's)
    and ActivationStats. It used to hang at set-up: rank 0 alone read `trainer.log_dir`, a broadcast."""
    fit = ["fit", "--config", QUICKSTART, *EXTRA, *TWO_CPU_RANKS, *NO_BAR, "--trainer.max_epochs", "2"]
    (in_tmp / "torchrun").mkdir()
    torchrun = launch(*fit, cwd=in_tmp / "torchrun", launcher=TORCHRUN)  # Lightning then launches nothing
    result = run_train(*fit, cwd=in_tmp, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sync_dist" not in result.stderr  # metrics already reduced over ranks are logged without warnings
    folder = in_tmp / "runs" / "quickstart" / "version_0"
    rows = [r for r in metric_rows(folder) if r.get("val/acc")]
    assert [r["epoch"] for r in rows] == ["0", "1"]
    ddp_acc, ddp_loss = float(rows[-1]["val/acc"]), float(rows[-1]["val/loss"])
    assert (folder / "config.yaml").is_file() and not (in_tmp / "runs" / "quickstart" / "version_1").exists()
    assert (folder / "checkpoints" / "last.ckpt").is_file() and list((folder / "checkpoints").glob("epoch*.ckpt"))

    # W&B: one run for both ranks, the folder's, with the callbacks' tables and plots in it
    (run,) = (in_tmp / "wandb").glob("offline-run-*")
    assert run == wandb_run_of(folder, in_tmp)
    logged = media(run)
    for key in ("images/dead/per_layer", "table/dead/table", "table/act/pca_explained"):
        assert any(m.startswith(f"{key}_") for m in logged), (key, sorted(logged))

    launched = torchrun.result(timeout=240)
    assert launched.returncode == 0, launched.stderr[-3000:]
    torchrun_folder = in_tmp / "torchrun" / "runs" / "quickstart" / "version_0"
    wandb_run_of(torchrun_folder, in_tmp / "torchrun")
    assert len(metric_rows(torchrun_folder)) == len(metric_rows(folder)) > 0
    for got, want in zip(metric_rows(torchrun_folder), metric_rows(folder), strict=True):  # torchrun = Lightning's
        assert {k: float(v) for k, v in got.items() if v} == pytest.approx(
            {k: float(v) for k, v in want.items() if v}, nan_ok=True
        )

    # the same weights validated by one process over the whole validation split
    single = cli(
        "validate", "--config", QUICKSTART, *EXTRA, "--ckpt_path", folder / "checkpoints" / "last.ckpt", *REFERENCE
    ).trainer.callback_metrics
    single_folder = in_tmp / "runs" / "quickstart" / "version_1"
    assert ddp_acc == pytest.approx(single["val/acc"].item(), abs=1e-7)
    assert ddp_loss == pytest.approx(single["val/loss"].item(), rel=1e-5)

    # dead units: each unit's peak over the split is a maximum over ranks, exact to the bit
    ddp_peaks, single_peaks = saved(folder, "dead_units"), saved(single_folder, "dead_units")
    assert ddp_peaks.keys() == single_peaks.keys() and len(ddp_peaks) == 9
    for name in ddp_peaks:
        assert torch.equal(ddp_peaks[name], single_peaks[name]), name
    assert float(rows[-1]["dead/total"]) == single["dead/total"].item()

    # dormant scores: per-unit sums added over ranks, the same as one process's to float32 rounding
    ddp_health = torch.load(folder / "unit_health.pt", weights_only=True)
    single_health = torch.load(single_folder / "unit_health.pt", weights_only=True)
    assert ddp_health.keys() == single_health.keys() == ddp_peaks.keys()
    for name, record in ddp_health.items():
        assert len(record["steps"]) == 2  # one observation per validation epoch
        assert torch.allclose(record["scores"][-1], single_health[name]["scores"][-1], rtol=1e-5, atol=1e-7), name
    # training dynamics (the quickstart's TrainingDynamics): logged once per step by rank 0, with every layer
    dynamics = [r for r in metric_rows(folder) if r.get("grad_norm/total")]
    assert dynamics and all(float(r["grad_norm/total"]) > 0 for r in dynamics)
    assert len({r["step"] for r in dynamics}) == len(dynamics)

    # activation moments merged over ranks: the same counts, means and variances as one process
    ddp_stats, single_stats = saved(folder, "activation_stats"), saved(single_folder, "activation_stats")
    assert ddp_stats["features.0"]["count"] == 301 * 28 * 28  # every position of every image, once
    for name, stats in ddp_stats.items():
        assert stats["count"] == single_stats[name]["count"], name
        # float32 batch sums, batched differently on 2 ranks: equal to float32 rounding
        assert torch.allclose(stats["mean"], single_stats[name]["mean"], rtol=1e-5, atol=1e-6), name
        assert torch.allclose(stats["var"], single_stats[name]["var"], rtol=1e-5, atol=1e-6), name


@pytest.mark.slow(48)
@pytest.mark.subprocess
def test_ddp_validate_and_test_with_wandb_finish_and_equal_one_process(in_tmp, launch):
    """`validate` and `test` of a checkpoint on 2 ranks, W&B and the callbacks on: each ends, in a run folder and
    a W&B run of its own, with the metrics and dead units one process gets over the same (unpadded) split."""
    checkpoint = Path(fit_quickstart("--data.val_size", "301").log_dir) / "checkpoints" / "last.ckpt"
    args = ["--config", QUICKSTART, *EXTRA, "--ckpt_path", checkpoint]
    launched = {
        stage: launch(stage, *args, *TWO_CPU_RANKS, *NO_BAR, "--name", f"ddp_{stage}", cwd=in_tmp)
        for stage in ("validate", "test")
    }
    for stage, split in (("validate", "val"), ("test", "test")):
        result = launched[stage].result(timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        folder = in_tmp / "runs" / f"ddp_{stage}" / "version_0"
        wandb_run_of(folder, in_tmp)
        (row,) = [r for r in metric_rows(folder) if r.get(f"{split}/acc")]
        single = cli(stage, *args, "--name", f"single_{stage}", *REFERENCE).trainer.callback_metrics
        assert float(row[f"{split}/acc"]) == pytest.approx(single[f"{split}/acc"].item(), abs=1e-7), stage
        assert float(row[f"{split}/loss"]) == pytest.approx(single[f"{split}/loss"].item(), rel=1e-5), stage
        if stage == "validate":  # DeadUnits and ActivationStats observe the validation split
            assert float(row["dead/total"]) == single["dead/total"].item()
            assert saved(folder, "activation_stats")["features.0"]["count"] == 301 * 28 * 28


@pytest.mark.slow(26)
@pytest.mark.subprocess
def test_ddp_student_attention_transfer_equals_one_process_on_the_same_batch(in_tmp):
    """A student trains 3 steps on 2 ranks, W&B on; its validation AT losses (per-device maps, averaged over ranks
    by the metrics) equal one process's on the same 16 images with the same weights. (Training steps differ:
    batch norm normalises each rank's half on its own, and SyncBatchNorm needs GPUs.)"""
    config = CONFIGS / "compression" / "mnist_student.yaml"
    args = [*data_args(config, in_tmp / "data"), *teacher_args(config, in_tmp / "teacher")]
    fit = ["fit", "--config", config, *args, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3"]
    result = run_train(*fit, "--data.batch_size", "8", *TWO_CPU_RANKS, *NO_BAR, "--name", "ddp", cwd=in_tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = in_tmp / "runs" / "ddp" / "version_0"
    wandb_run_of(folder, in_tmp)
    ddp = {k: float(v) for row in metric_rows(folder) for k, v in row.items() if v}
    single = cli(
        "validate", "--config", config, *args, "--ckpt_path", folder / "checkpoints" / "last.ckpt", *REFERENCE
    ).trainer.callback_metrics
    for key in ("val/at_g1", "val/at_g2", "val/at_g3", "val/task", "val/loss"):
        assert ddp[key] == pytest.approx(single[key].item(), rel=1e-5), key
    assert ddp["val/at_g3"] > 0 and ddp["train/at_g3"] > 0


def test_a_run_leaves_no_process_group_behind(in_tmp):
    """`train.py` destroys the DDP process group when the run ends: a gloo group left to interpreter shutdown
    aborted a rank now and then ("terminate called without an active exception") after a fit that succeeded."""
    from lightning_modules.run.cli import main

    dist = torch.distributed
    dist.init_process_group("gloo", store=dist.FileStore(str(in_tmp / "store"), 1), rank=0, world_size=1)
    try:
        main(["fit", "--config", str(QUICKSTART), "--trainer.fast_dev_run", "1", "--trainer.strategy", "ddp",
              "--trainer.accelerator", "cpu", "--trainer.devices", "1", *QUIET])  # fmt: skip
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
