"""Resuming in place: a killed run continues its own folder, metrics.csv and W&B run, a requeued SLURM job
resumes by itself, a killed search continues from its results file, a study killed before its first trial continues
its folder, and another config's checkpoint is refused; result files are written atomically."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_modules.run.files import atomic_path, atomic_write
from lightning_modules.run.requeue import Requeue
from lightning_modules.run.run_folder import config_differences, last_checkpoint, trim_metrics
from tests.conftest import CONFIGS, ROOT, child_env, cli, cli_error

QUICK = ["fit", "--config", CONFIGS / "quickstart.yaml", "--trainer.max_epochs", "3"]
QUIET_BAR = ["--trainer.enable_progress_bar", "false"]


def start_train(*args, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    env = child_env(WANDB_MODE="offline", **(env or {}))
    command = [sys.executable, str(ROOT / "train.py"), *map(str, args)]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    out, _ = process.communicate(timeout=300)
    return process.returncode, out


def metric_rows(folder: Path) -> list[dict]:
    return list(csv.DictReader((folder / "metrics.csv").open()))


def files_of(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> Path:
    """The quickstart's 3 epochs, never stopped (W&B offline): what the killed, requeued and resumed runs must
    end as. Trained once per test process (a worker that runs this module's tests between others' keeps it)."""
    whole = tmp_path_factory.mktemp("whole")
    code, out = finish(start_train(*QUICK, *QUIET_BAR, cwd=whole))
    assert code == 0, out[-3000:]
    return whole / "runs" / "quickstart" / "version_0"


@pytest.mark.slow(50)
@pytest.mark.subprocess
def test_a_run_killed_mid_epoch_resumes_in_its_own_folder_as_if_never_killed(tmp_path, uninterrupted):
    killed = tmp_path / "killed"
    killed.mkdir()
    killed_code, killed_out = finish(
        start_train(*QUICK, *QUIET_BAR, "--trainer.callbacks+=tests.killer.KillAt", cwd=killed)
    )
    assert killed_code == -signal.SIGKILL, killed_out[-3000:]  # killed in epoch 1, after last.ckpt of epoch 0
    folder = killed / "runs" / "quickstart" / "version_0"
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    run_id = (folder / "wandb_run_id").read_text()

    code, out = finish(start_train(*QUICK, *QUIET_BAR, "--ckpt_path", "last", cwd=killed))
    assert code == 0, out[-3000:]
    assert "resuming runs/quickstart/version_0 at step 19" in out
    assert [p.name for p in (killed / "runs" / "quickstart").iterdir()] == ["version_0"]  # no version_1
    assert files_of(folder) == files_of(uninterrupted)  # the same checkpoints, dead-unit files, config, metrics
    resumed, whole = metric_rows(folder), metric_rows(uninterrupted)
    assert [(r["epoch"], r["step"]) for r in resumed] == [(r["epoch"], r["step"]) for r in whole]
    for split in ("val", "train"):  # one row of each split for each of 3 epochs: none twice, none missing
        assert [r["epoch"] for r in resumed if r[f"{split}/acc"]] == ["0", "1", "2"], split
    raw = (folder / "metrics.csv").read_bytes()
    assert raw.count(b"\n") == raw.count(b"\r\n") == len(resumed) + 1  # one line ending, as Lightning writes it
    for got, want in zip(resumed, whole, strict=True):
        for key, value in want.items():
            assert (float(got[key]) if got[key] else None) == pytest.approx(float(value) if value else None), key
    assert (folder / "wandb_run_id").read_text() == run_id  # the same W&B run, continued
    assert len(list((killed / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert f"W&B: resumed run {run_id}" in out
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["ckpt_path"].endswith("version_0/checkpoints/last.ckpt")  # the resumed run's own config


def test_ckpt_path_last_without_a_run_to_resume_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    error = cli_error(*QUICK, "--ckpt_path", "last", "--wandb", "false", capsys=capsys)
    assert error == "error: --ckpt_path last: no runs/quickstart/version_*/checkpoints/last.ckpt to resume"


def test_last_checkpoint_is_the_newest_run_that_has_one(tmp_path):
    for version in (0, 2, 10):
        (tmp_path / f"version_{version}" / "checkpoints").mkdir(parents=True)
    for version in (2, 0):
        (tmp_path / f"version_{version}" / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert last_checkpoint(tmp_path) == tmp_path / "version_2" / "checkpoints" / "last.ckpt"  # 10 has none


def test_trim_metrics_keeps_what_the_checkpoint_saw(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,val/acc,act/x\n0,18,0.5,\n0,18,,\n,19,,1.0\n1,37,0.7,\n,38,,2.0\n2,40,,\n")
    trim_metrics(path, epoch=0, step=19)  # the checkpoint at the end of epoch 0 (global step 19)
    assert path.read_text() == "epoch,step,val/acc,act/x\n0,18,0.5,\n0,18,,\n,19,,1.0\n"


def test_atomic_files_keep_the_old_version_when_writing_fails(tmp_path):
    path = tmp_path / "results.csv"
    atomic_write(path, "old\n")
    with pytest.raises(RuntimeError), atomic_path(path) as temporary:
        temporary.write_text("half of the ne")
        raise RuntimeError("killed")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["results.csv"]


SEARCH = [
    "search",
    "--config",
    CONFIGS / "quickstart.yaml",
    "--upper",
    "6",
    "--seeds",
    "2",
    "--trainer.max_steps",
    "20",
    "--wandb",
    "false",
]


def trials_of(folder: Path) -> list[dict]:
    """The search's trials without their wall times, which no two runs share."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader((folder / "results.csv").open())]


def without_times(results_md: Path) -> str:
    """results.md with each variant's trials' time blanked."""
    return re.sub(r"\| [0-9.]+ min \|$", "| |", results_md.read_text(), flags=re.M)


@pytest.mark.slow(28)
@pytest.mark.subprocess
def test_a_killed_search_restarted_with_the_same_command_continues_from_its_results(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    uninterrupted = start_train(*SEARCH, cwd=whole)
    search = start_train(*SEARCH, cwd=killed)
    results = killed / "runs" / "quickstart" / "version_0" / "results.csv"
    deadline = time.time() + 240
    while time.time() < deadline and search.poll() is None:
        if results.is_file() and len(results.read_text().splitlines()) >= 3:  # header and two trials
            search.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    code, _ = finish(search)
    assert code == -signal.SIGKILL
    done = trials_of(results.parent)
    assert 2 <= len(done) < 8 and not (results.parent / "results.md").exists()

    code, out = finish(start_train(*SEARCH, cwd=killed))
    assert code == 0, out[-3000:]
    assert f"search: {len(done)} trial(s) already in runs/quickstart/version_0/results.csv" in out
    trained = [line for line in out.splitlines() if line.startswith("  quickstart k=")]
    whole_code, whole_out = finish(uninterrupted)
    assert whole_code == 0, whole_out[-3000:]
    reference = trials_of(whole / "runs" / "quickstart" / "version_0")
    assert len(trained) == len(reference) - len(done)  # only the trials it did not have were trained
    assert [p.name for p in (killed / "runs" / "quickstart").iterdir()] == ["version_0"]
    assert sorted(trials_of(results.parent), key=str) == sorted(reference, key=str)  # the same study
    assert without_times(results.parent / "results.md") == without_times(whole / "runs/quickstart/version_0/results.md")


SLURM_JOB = {  # what SLURM sets for a one-task batch job
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "1",
    "SLURM_JOB_NAME": "netlab",
    "SLURM_NODELIST": "localhost",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


@pytest.mark.slow(24)
@pytest.mark.subprocess
def test_a_slurm_job_requeued_on_its_signal_resumes_by_itself_as_if_never_stopped(tmp_path, uninterrupted):
    """SLURM's time-limit signal mid-epoch: the run saves requeue.ckpt in its folder, calls `scontrol requeue`
    (a stand-in that records it) and ends; the same command in the requeued job (same job id, no --ckpt_path)
    resumes there. Not tested: a real SLURM cluster, srun, several nodes."""
    job = tmp_path / "job"
    job.mkdir()
    (tmp_path / "bin").mkdir()
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    slurm = {**SLURM_JOB, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    signalled = start_train(
        *QUICK, *QUIET_BAR, "--wandb", "false", "--trainer.callbacks+=tests.killer.SignalAt", cwd=job, env=slurm
    )
    code, out = finish(signalled)
    assert code == 0, out[-3000:]
    folder = job / "runs" / "quickstart" / "version_0"
    assert "SLURM: saved runs/quickstart/version_0/checkpoints/requeue.ckpt and requeued job 4242" in out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    # signalled before batch 5 of epoch 1, saved at the end of that batch: 19 + 6 steps
    assert torch.load(folder / "checkpoints" / "requeue.ckpt", weights_only=True)["global_step"] == 19 + 6

    code, out = finish(start_train(*QUICK, *QUIET_BAR, "--wandb", "false", cwd=job, env=slurm))  # the requeued job
    assert code == 0, out[-3000:]
    assert "SLURM: job 4242 was requeued; resuming from runs/quickstart/version_0/checkpoints/requeue.ckpt" in out
    assert [p.name for p in (job / "runs" / "quickstart").iterdir()] == ["version_0"]
    resumed, whole = metric_rows(folder), metric_rows(uninterrupted)  # W&B plays no part in the metrics
    assert [(r["epoch"], r["step"]) for r in resumed] == [(r["epoch"], r["step"]) for r in whole]
    for got, want in zip(resumed, whole, strict=True):  # the train metrics of the split epoch too
        for key, value in want.items():
            assert (float(got[key]) if got[key] else None) == pytest.approx(float(value) if value else None), key


def test_the_requeue_marker_reads_the_run_folder_on_every_rank(tmp_path):
    """`trainer.log_dir` is a broadcast under DDP: read by rank 0 alone (as the marker once was, and RunConfig's W&B
    id), it leaves the other ranks waiting for ever. Every rank reads it; rank 0 alone writes the marker."""
    reads = []

    class Trainer:
        loggers, default_root_dir = [object()], str(tmp_path)

        def __init__(self, rank: int):
            self.global_rank, self.is_global_zero = rank, rank == 0

        @property
        def log_dir(self) -> str:
            reads.append(self.global_rank)
            return str(tmp_path)

    previous = signal.getsignal(signal.SIGUSR1)
    try:
        for rank in (1, 0):
            Requeue("4242").setup(Trainer(rank), None, "fit")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert reads == [1, 0] and (tmp_path / "slurm_job_id").read_text() == "4242"


class Killed(BaseException):
    """A kill: the process ends where it is, with none of its own clean-up."""


@pytest.mark.parametrize("study", ["search", "propagate"])
def test_a_study_killed_before_its_first_trial_is_continued_in_its_folder_by_the_same_command(
    study, in_tmp, monkeypatch, capsys
):
    from lightning_modules.run.loggers import RunWandbLogger
    from lightning_modules.run.run_state import Run
    from lightning_modules.studies import propagate
    from lightning_modules.studies.launchers import LocalLauncher

    command = [study, "--config", CONFIGS / "quickstart.yaml", *QUIET_BAR]
    command += (
        ["--upper", "3", "--trainer.max_steps", "3"] if study == "search" else ["--depths", "[6]", "--seeds", "1"]
    )

    def kill(*args, **kwargs):
        raise Killed

    started, start = [], RunWandbLogger.start
    with monkeypatch.context() as killed:
        killed.setattr(Run, "discard_if_untrained", lambda self, trainer: None)  # a kill cleans nothing up
        killed.setattr(LocalLauncher, "submit", kill)  # the search's first trial
        killed.setattr(propagate, "probe", kill)  # propagate's first net
        killed.setattr(RunWandbLogger, "start", lambda self: started.append(self) or start(self))
        with pytest.raises(Killed):
            cli(*command)
    for logger in started:  # the killed process's W&B run ends with the process
        logger.wait().finish()
    folder = Path("runs") / "quickstart" / "version_0"
    assert (folder / "config.yaml").is_file()
    capsys.readouterr()
    trainer = cli(*command).trainer
    assert f"{study}: continuing {folder}, which this command started and did not finish" in capsys.readouterr().out
    assert Path(trainer.log_dir) == folder and [p.name for p in folder.parent.iterdir()] == ["version_0"]
    assert (folder / ("results.md" if study == "search" else "propagation.md")).is_file()
    trainer.loggers[1].experiment.finish()  # as the process's end would


def test_resuming_another_configs_checkpoint_is_refused_and_leaves_that_run_untouched(in_tmp, capsys):
    """`fit --config A --ckpt_path <a run of config B>/last.ckpt` used to say "resuming" that run, overwrite its
    config.yaml with A's and continue its W&B run."""
    short = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", *QUIET_BAR]
    trained = cli(*QUICK[:3], "--trainer.max_epochs", "1", *short).trainer
    trained.loggers[1].experiment.finish()  # as the process's end would: the W&B run can be resumed
    folder = Path(trained.log_dir)
    checkpoint = folder / "checkpoints" / "last.ckpt"

    def state() -> tuple[dict, list]:
        """The bytes of every file under runs/, and the W&B runs (their folders)."""
        return {p: p.read_bytes() for p in Path("runs").rglob("*") if p.is_file()}, sorted(Path("wandb").glob("*run-*"))

    before = state()
    lr = ["--model.init_args.optimizer.init_args.lr", "0.1"]
    error = cli_error(*QUICK[:3], *lr, "--ckpt_path", checkpoint, *short, capsys=capsys)
    assert error == (
        f"error: --ckpt_path {checkpoint} is a checkpoint of {folder}, which trained with another config (it differs "
        f"in model.init_args.optimizer.init_args.lr): resume that run with its own, --config {folder}/config.yaml "
        f"--name quickstart"
    )
    assert state() == before  # nothing of that run touched, no W&B run started or continued
    own = ["fit", "--config", folder / "config.yaml", "--name", "quickstart", "--trainer.max_epochs", "2"]
    own = cli(*own, "--ckpt_path", checkpoint, *short)
    assert Path(own.trainer.log_dir) == folder and own.trainer.current_epoch == 2  # with its own config: resumed
    own.trainer.loggers[1].experiment.finish()
    longer = cli(
        *QUICK[:3], "--trainer.max_epochs", "3", "--data.on_device", "false", "--ckpt_path", checkpoint, *short
    )
    longer = longer.trainer  # a longer run of the same config, its data held elsewhere: resumed
    assert Path(longer.log_dir) == folder and longer.current_epoch == 3
    longer.loggers[1].experiment.finish()


def test_config_differences_name_each_changed_setting_once_and_ignore_what_only_one_config_has():
    saved = {
        "seed_everything": 0,
        "trainer": {"precision": "32-true", "max_epochs": 5},
        "model": {"class_path": "C", "init_args": {"lr": 0.1, "scheduler": None, "net": {"class_path": "N"}}},
        "data": {"class_path": "Digits", "init_args": {"batch_size": 64}},
    }
    current = {
        "seed_everything": 0,
        "trainer": {"precision": "32-true", "max_epochs": 10},  # longer: not among the settings compared
        "model": {"class_path": "C", "init_args": {"lr": 0.1, "scheduler": {"class_path": "S"}, "new_arg": 1}},
        "data": {"class_path": "MNIST", "init_args": {"batch_size": 32}},
    }
    settings = ("seed_everything", "model", "data", "trainer.precision")
    assert config_differences(saved, current, settings) == ["model.init_args.scheduler", "data.class_path"]
    assert config_differences(saved, saved, settings) == []
