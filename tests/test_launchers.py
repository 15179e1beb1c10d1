"""Launchers: trials here or on Ray (2 workers on this CPU) give the same tables; crashes are retried once,
then reported; each trial is a W&B run in the study's group; without Ray, one line says how to install it."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from pytorch_lightning.loggers import WandbLogger

from lightning_modules.errors import ConfigError
from lightning_modules.run.files import atomic_write_csv
from lightning_modules.studies.launchers import (
    RAY_HINT,
    Failed,
    LocalLauncher,
    _call_in_worker,
    make_launcher,
    written_out,
)
from lightning_modules.studies.trials import TrialRuns
from tests.conftest import CONFIGS, QUIET, ROOT, cli, make_mnist


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance with 2 CPUs (2 trials at once), shared by this module's tests; launchers use it."""
    ray = pytest.importorskip("ray", reason="the Ray launcher's tests need the extra: pip install -e '.[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def attempt_counter(folder: Path):
    """`attempt(name)`: records one more attempt of `name` in `folder` and returns its number (a file per
    attempt, so the count survives a worker that dies). A closure, so Ray ships it by value."""

    def attempt(name: str) -> int:
        folder.mkdir(exist_ok=True)
        n = len(list(folder.glob(f"{name}-*"))) + 1
        (folder / f"{name}-{n}").touch()
        return n

    return attempt


def test_the_local_launcher_runs_in_order_and_retries_a_crash_once(tmp_path, capsys):
    attempts = attempt_counter(tmp_path)

    def flaky(x):
        if attempts("flaky") == 1:
            raise RuntimeError("first attempt")
        return x + 1

    def broken(x):
        attempts("broken")
        raise ValueError(f"bad trial {x}\nsecond line")

    launcher = LocalLauncher()
    handles = [launcher.submit("flaky", flaky, 1), launcher.submit("broken", broken, 7)]
    outcomes = [launcher.wait() for _ in handles]
    assert [h for h, _ in outcomes] == handles  # in the order submitted
    assert outcomes[0][1] == 2 and outcomes[1][1] == Failed("ValueError: bad trial 7")
    assert len(list(tmp_path.glob("broken-*"))) == 2  # tried twice, no more
    assert "broken crashed (attempt 2 of 2): ValueError: bad trial 7" in capsys.readouterr().out

    def interrupted():
        raise KeyboardInterrupt

    launcher.submit("interrupted", interrupted)
    with pytest.raises(KeyboardInterrupt):  # the user stops the study: not a trial's failure
        launcher.wait()


def test_launcher_options_are_checked():
    with pytest.raises(ConfigError, match="--ray_address needs --launcher ray"):
        make_launcher("local", ray_address="ray://head:10001")
    with pytest.raises(ConfigError, match="must be one of local, ray"):
        make_launcher("slurm")


def test_without_ray_the_ray_launcher_says_how_to_install_it(monkeypatch, in_tmp):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    from lightning_modules.run.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["search", "--config", str(CONFIGS / "quickstart.yaml"), "--upper", "3", "--launcher", "ray", *QUIET])
    assert str(stop.value.code) == f"error: {RAY_HINT}" and "pip install -e '.[ray]'" in RAY_HINT
    assert not list((in_tmp / "runs").glob("*/version_*"))  # nothing trained: no run folder left behind


@pytest.mark.slow(13)
@pytest.mark.subprocess
def test_ray_runs_trials_at_once_retries_a_dead_worker_and_reports_a_second_failure(ray_instance, tmp_path):
    attempts = attempt_counter(tmp_path / "log")

    def meet(name, other):  # returns only if the other trial runs at the same time
        (tmp_path / name).touch()
        deadline = time.time() + 60
        while not (tmp_path / other).exists() and time.time() < deadline:
            time.sleep(0.05)
        return (tmp_path / other).exists()

    def dies_once(x):
        import os

        if attempts("dies") == 1:
            os._exit(1)  # the worker process dies
        return 2 * x

    def raises(x):
        attempts("raises")
        raise RuntimeError(f"bad trial {x}")

    launcher = make_launcher("ray", cpus_per_trial=1)
    try:
        names = {
            launcher.submit("a", meet, "a", "b"): "a",
            launcher.submit("b", meet, "b", "a"): "b",
            launcher.submit("dies", dies_once, 21): "dies",
            launcher.submit("raises", raises, 3): "raises",
        }
        outcomes = {names[h]: outcome for h, outcome in (launcher.wait() for _ in names)}
    finally:
        launcher.close()
    assert outcomes["a"] is True and outcomes["b"] is True  # two trials ran at once
    assert outcomes["dies"] == 42  # retried once on a new worker
    assert isinstance(outcomes["raises"], Failed) and "RuntimeError: bad trial 3" in outcomes["raises"].error
    assert len(list((tmp_path / "log").glob("raises-*"))) == 2 and len(list((tmp_path / "log").glob("dies-*"))) == 2


def test_a_ray_task_returns_once_the_wandb_runs_it_finished_are_written(tmp_path, monkeypatch):
    """W&B's service writes a finished run's file (all of a small run's records) only when it closes the run, after
    `finish()` returned; a Ray worker outlives its task and is killed, not exited, at the end. Here the service is
    paused for a second as the run closes, as a loaded machine delays it: the task returns after it, not before."""
    import signal
    import threading

    from wandb.sdk.lib.service.service_connection import ServiceConnection

    inform_finish = ServiceConnection.inform_finish

    def slow_service(self, run_id: str) -> None:
        pid = self._proc._process.pid  # the W&B service this process started
        os.kill(pid, signal.SIGSTOP)
        threading.Timer(1.0, os.kill, (pid, signal.SIGCONT)).start()
        inform_finish(self, run_id)

    monkeypatch.setattr(ServiceConnection, "inform_finish", slow_service)

    def trial() -> Path:
        run = TrialRuns("netlab", "study-x1", str(tmp_path), offline=True).start("depth/tanh k=3 seed=0", {"depth": 3})
        run.log({"val/err": 0.5})
        run.finish()
        return Path(run.settings.sync_file)

    written = _call_in_worker(trial, 1).read_bytes()
    assert b"study-x1" in written and b"depth/tanh k=3 seed=0" in written  # its group and name, on disk


def run_in(folder: Path, monkeypatch, *args: str) -> Path:
    """Run the CLI in `folder` (made if new) as a process would: its W&B run finished and written out at the end."""
    folder.mkdir(exist_ok=True)
    monkeypatch.chdir(folder)
    trainer = cli(*args).trainer
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
    written_out()  # what the process's exit does: the file of a finished run is written when W&B closes it, later
    return Path(trainer.log_dir)


def rows(path: Path) -> list[dict]:
    return sorted(csv.DictReader(path.open(newline="")), key=lambda r: sorted(r.items()))


@pytest.mark.slow(56)
@pytest.mark.subprocess
def test_a_search_of_two_variants_on_ray_gives_the_local_tables_and_one_wandb_run_per_trial(
    ray_instance, tmp_path, monkeypatch, capsys
):
    variants = f"{{{CONFIGS / 'depth' / 'tanh.yaml'}: 6, {CONFIGS / 'depth' / 'resnet.yaml'}: 6}}"
    args = ["search", "--config", CONFIGS / "quickstart.yaml", "--variants", variants, "--trainer.max_steps", "8"]
    args += ["--max_error", "0.5", *QUIET[2:], "--name", "study"]  # resnet trains at k = 3: a longer search
    local = run_in(tmp_path / "local", monkeypatch, *args, "--wandb", "false")
    on_ray = run_in(
        tmp_path / "ray", monkeypatch, *args, "--wandb", "true", "--config", CONFIGS / "presets" / "ray.yaml"
    )
    assert (on_ray / "results.md").read_text() == (local / "results.md").read_text()
    trials = rows(local / "results.csv")
    assert rows(on_ray / "results.csv") == trials and {t["variant"] for t in trials} == {"depth/tanh", "depth/resnet"}

    # as if killed before its last two trials: restarted, the same command trains only the trials it lacks
    kept = list(csv.DictReader((on_ray / "results.csv").open(newline="")))[:-2]
    atomic_write_csv(on_ray / "results.csv", list(kept[0]), kept)
    (on_ray / "results.md").unlink()
    for run in (tmp_path / "ray" / "wandb").glob("offline-run-*"):  # the W&B runs of the lost trials stay
        shutil.move(run, tmp_path / run.name)
    capsys.readouterr()
    again = run_in(
        tmp_path / "ray", monkeypatch, *args, "--wandb", "true", "--config", CONFIGS / "presets" / "ray.yaml"
    )
    out = capsys.readouterr().out
    assert again == on_ray and f"search: {len(kept)} trial(s) already in" in out
    assert sum(line.startswith("  depth/") for line in out.splitlines()) == 2
    assert (on_ray / "results.md").read_text() == (local / "results.md").read_text()

    study = (on_ray / "wandb_run_id").read_text().strip()
    runs = {p.stem.split("-", 1)[1]: p.read_bytes() for p in (tmp_path / "ray" / "wandb").glob("offline-run-*/*.wandb")}
    assert len(runs) == 2 + 1 and study in runs  # the study's run (resumed) and one per trial
    group = f"study-{study}".encode()
    assert [run for run, data in runs.items() if group not in data] == []  # all in the study's W&B group
    done = {(k["variant"], k["depth"], k["seed"]) for k in kept}
    for t in [t for t in trials if (t["variant"], t["depth"], t["seed"]) not in done]:
        name = f"{t['variant']} k={t['depth']} seed={t['seed']}".encode()
        assert sum(name in data for data in runs.values()) == 1


@pytest.mark.slow(22)
@pytest.mark.subprocess
def test_a_sweep_on_ray_gives_the_local_tables(ray_instance, tmp_path, monkeypatch):
    data = make_mnist(tmp_path / "data", n_train=120)
    args = ["sweep", "--config", CONFIGS / "network_size" / "flexible.yaml", "--data.data_dir", data]
    args += ["--data.download", "false", "--data.val_size", "24", "--data.batch_size", "16", *QUIET, "--name", "s"]
    args += ["--config", CONFIGS / "network_size" / "sweep_widths.yaml", "--seeds", "2", "--epochs", "1"]
    args += ["--grids", "[{layer: [static], width: [16, 32]}]"]  # two stacks, as the config's twelve would be
    local = run_in(tmp_path / "local", monkeypatch, *args)
    on_ray = run_in(tmp_path / "ray", monkeypatch, *args, "--launcher", "ray")
    for table in ("runs.csv", "history.csv", "runs.md"):
        assert (on_ray / table).read_text() == (local / table).read_text(), table
    assert len(list(csv.DictReader((local / "runs.csv").open()))) >= 4  # two stacks or more, two seeds each


def test_the_ray_extra_installs_the_client_that_a_ray_address_needs():
    """`--ray_address ray://head-node:10001`, the README's form, is Ray Client: it needs `ray[client]` (grpcio)."""
    (extra,) = [line for line in (ROOT / "pyproject.toml").read_text().splitlines() if line.startswith("ray = ")]
    assert '"ray[client]>=' in extra
    import grpc  # noqa: F401 (what Ray Client needs, installed by the extra)
    from ray.util.client import ray as client  # noqa: F401
