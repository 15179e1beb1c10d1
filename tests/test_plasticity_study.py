"""The `plasticity` study: interventions x seeds over a task stream, its per-task table and summary, continued after
a kill, and what it refuses."""

import csv
from pathlib import Path

import pytest

from lightning_modules.studies.launchers import written_out
from tests.conftest import CONFIGS, QUIET, cli, cli_error

STREAM = ["--config", CONFIGS / "plasticity" / "permuted_digits.yaml", "--data.init_args.tasks", "3",
          "--data.init_args.steps_per_task", "6", "--trainer.max_steps", "18", "--trainer.val_check_interval", "6",
          *QUIET]  # fmt: skip
TWO = ["--interventions", "{none: {}, head_reset: {head_reset: true}}", "--seeds", "2"]


@pytest.mark.slow
def test_the_study_reports_each_task_and_a_killed_one_continues_without_training_its_finished_trials(in_tmp, capsys):
    cli("plasticity", *STREAM, *TWO)
    folder = in_tmp / "runs" / "plasticity" / "permuted_digits" / "version_0"
    table = list(csv.DictReader((folder / "results.csv").open()))
    assert sorted({(r["intervention"], r["seed"]) for r in table}) == [
        ("head_reset", "0"), ("head_reset", "1"), ("none", "0"), ("none", "1")]  # fmt: skip
    assert sorted(int(r["task"]) for r in table if r["intervention"] == "none" and r["seed"] == "0") == [0, 1, 2]
    none = {int(r["task"]): r for r in table if r["intervention"] == "none" and r["seed"] == "0"}
    reset = {int(r["task"]): r for r in table if r["intervention"] == "head_reset" and r["seed"] == "0"}
    assert none[0]["acc_online"] == reset[0]["acc_online"]  # the same seed trains alike until the first boundary
    assert none[1]["acc_online"] != reset[1]["acc_online"]  # where the head is re-drawn
    text = (folder / "results.md").read_text()
    assert "| none | 2 |" in text and "| head_reset | 2 |" in text  # per intervention and task
    assert "| intervention | first 3 | last 3 | change |" in text
    assert (folder / "plasticity.png").stat().st_size > 1000 and (folder / "mechanism.png").stat().st_size > 1000
    assert all(0 <= float(r["dormant"]) <= 1 and float(r["srank"]) > 0 and float(r["weight_norm"]) > 0 for r in table)
    assert all(float(r["stable_rank"]) >= 1 and float(r["alpha"]) > 1 for r in table)  # the weights' spectra per task

    (folder / "results.md").unlink()  # killed before its end: the trials so far are in results.csv
    rows = list(csv.DictReader((folder / "results.csv").open()))
    with (folder / "results.csv").open("w", newline="") as f:  # and the last trial had not finished
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if not (r["intervention"] == "head_reset" and r["seed"] == "1"))
    capsys.readouterr()
    cli("plasticity", *STREAM, *TWO)
    out = capsys.readouterr().out
    assert "3 trial(s) already in" in out and "head_reset seed=1:" in out and "none seed=0:" not in out
    assert list(csv.DictReader((folder / "results.csv").open())) == rows
    assert not (in_tmp / "runs" / "plasticity" / "permuted_digits" / "version_1").exists()


def test_a_study_on_data_that_is_no_stream_or_with_unknown_settings_is_refused_in_one_line(in_tmp, capsys):
    error = cli_error("plasticity", "--config", CONFIGS / "quickstart.yaml", *QUIET, capsys=capsys)
    assert "plasticity needs a task stream: data: datamodules.TaskStream" in error
    error = cli_error("plasticity", *STREAM, "--interventions", "{odd: {shrinkage: 0.5}}", capsys=capsys)
    assert "interventions.odd:" in error and "shrinkage" in error
    error = cli_error("plasticity", *STREAM, "--interventions", "{shared: {perturb: 0.1, seed: 3}}", capsys=capsys)
    assert "interventions.shared.seed: each trial draws its fresh weights from its own seed" in error


@pytest.mark.slow
def test_each_trial_is_a_wandb_run_in_the_studys_group_with_its_tasks_measures(in_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    both = "{none: {}, cbp: {cbp: true}}"  # none's seeds train as one stack, CBP's through Lightning one by one
    trainer = cli("plasticity", *STREAM, "--interventions", both, "--seeds", "2", "--wandb", "true").trainer
    study = (Path(trainer.log_dir) / "wandb_run_id").read_text().strip()
    trainer.loggers[-1].experiment.finish()
    written_out()  # as at the end of the process: W&B writes a finished run's file when it closes it
    runs = {p.stem.split("-", 1)[1]: p.read_bytes() for p in in_tmp.glob("wandb/offline-run-*/*.wandb")}
    assert len(runs) == 5 and study in runs  # the study's run and one per intervention and seed
    assert all(f"{trainer.run.name}-{study}".encode() in data for data in runs.values())  # in the study's group
    trials = [data for run, data in runs.items() if run != study]
    assert all(b"task/acc_online" in data and b"task/weight_norm" in data for data in trials)
    for name in (b"none seed=1", b"cbp seed=0"):
        assert sum(name in data for data in trials) == 1, name
    assert sum(b"dead/hidden" in data for data in trials) == 2  # per layer: what only the Lightning trials log
