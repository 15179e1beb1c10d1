"""What a user sees: the project's own lines and the progress bar, libraries' chatter only with --verbose;
and commands that run nothing (help, print_config, count, config errors) start neither W&B nor data."""

import os
import subprocess
import sys

import pytest

from tests.conftest import CONFIGS, ROOT

LIBRARY_LINES = ("GPU available", "TPU available", "Tip:", "LeafSpec", "log_every_n_steps", "Seed set", "wandb:")


def run(*args: str, cwd, code: str | None = None) -> str:
    """`train.py ARGS` as a user runs it (W&B offline, its own verbosity), stdout and stderr together."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    env.update(PYTHONPATH=str(ROOT), WANDB_MODE="offline")
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, str(ROOT / "train.py"), *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 1, 2), result.stderr[-3000:]
    return result.stdout + result.stderr


FIT = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.max_epochs", "1"]
SHORT = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.callbacks=[]"]


@pytest.mark.slow
def test_a_fit_prints_the_projects_lines_and_one_wandb_line(tmp_path):
    out = run(*FIT, "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    for line in LIBRARY_LINES:
        assert line not in out, (line, out[-3000:])
    wandb_lines = [line for line in out.splitlines() if "W&B" in line or "wandb" in line.lower()]
    assert len(wandb_lines) == 1 and wandb_lines[0].startswith("W&B: run "), out[-3000:]
    assert "dead units (val, epoch 0" in out and "Params: 9.22600E+03" in out  # the project's own lines stay
    assert "Traceback" not in out and "Warning" not in out


@pytest.mark.slow
def test_verbose_shows_what_the_libraries_say(tmp_path):
    out = run(*FIT, *SHORT, "--trainer.enable_progress_bar", "false", "--verbose", "true", cwd=tmp_path)
    assert "GPU available" in out and "wandb:" in out


def test_count_prints_its_three_lines_and_nothing_else(tmp_path):
    out = run("count", "--config", str(CONFIGS / "depth" / "tanh.yaml"), "--data.data_dir", "nowhere", cwd=tmp_path)
    assert out.splitlines() == [
        "Mult-Adds: 1.48058E+05",
        "Params: 2.95400E+03",
        "Sanity check, parameters: 2.95400E+03",
    ]


STARTS_NOTHING = """
import sys
from lightning_modules.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("wandb imported:", "wandb" in sys.modules)
"""


@pytest.mark.parametrize(
    "args",
    [
        ["fit", "--help"],
        ["fit", "--config", str(CONFIGS / "depth" / "tanh.yaml"), "--print_config"],
        ["count", "--config", str(CONFIGS / "depth" / "tanh.yaml")],
        ["fit", "--config", str(CONFIGS / "depth" / "tanh.yaml"), "--trainer.max_epoch", "1"],
        ["fit", "--config", str(CONFIGS / "depth" / "tanh.yaml"), "--budget", "1000"],
    ],
    ids=["help", "print_config", "count", "wrong-key", "config-error"],
)
def test_commands_that_train_nothing_start_neither_wandb_nor_data(args, tmp_path):
    out = run(*args, "--data.data_dir", str(tmp_path / "no-data"), cwd=tmp_path, code=STARTS_NOTHING)
    assert "wandb imported: False" in out, out[-2000:]
    assert not any(tmp_path.iterdir())  # no data folder, no runs/, no wandb/
