"""What a user sees: the project's own lines and the progress bar, libraries' chatter only with --verbose;
and commands that run nothing (help, print_config, count, config errors) start neither W&B nor data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, ROOT

LIBRARY_LINES = ("GPU available", "TPU available", "Tip:", "LeafSpec", "log_every_n_steps", "Seed set", "wandb:")


def run(*args: str, cwd: Path, code: str | None = None) -> str:
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
    out = run(
        *FIT, *SHORT, "--trainer.enable_progress_bar", "false", "--wandb", "false", "--verbose", "true", cwd=tmp_path
    )
    assert "GPU available" in out and "Seed set to 0" in out


TANH = ["--config", str(CONFIGS / "depth" / "tanh.yaml")]
NOTHING_TO_TRAIN = {  # commands that train nothing, each with what the user must see
    "help": (["fit", "--help"], "--trainer.max_epochs"),
    "print_config": (["fit", *TANH, "--print_config"], "seed_everything: 0"),
    "count": (["count", *TANH], "Mult-Adds: 1.48058E+05\nParams: 2.95400E+03\nSanity check, parameters: 2.95400E+03"),
    "wrong-key": (["fit", *TANH, "--trainer.max_epoch", "1"], "did you mean --trainer.max_epochs"),
    "config-error": (["fit", *TANH, "--budget", "1000"], "error: --budget needs a net with a `budget` argument"),
}
STARTS_NOTHING = """
import contextlib, io, sys
from lightning_modules.cli import main
commands, sys.argv[1:] = eval(sys.argv[1]), []
for args in commands:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(args)
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code)
    print("=== " + out.getvalue().strip().replace(chr(10), chr(10) + "    "))
print("wandb imported:", "wandb" in sys.modules)
"""


@pytest.mark.slow
def test_commands_that_train_nothing_start_neither_wandb_nor_data(tmp_path):
    """--help, --print_config, count and config errors, in one process: none imports W&B or touches the data."""
    commands = [[*args, "--data.data_dir", str(tmp_path / "no-data")] for args, _ in NOTHING_TO_TRAIN.values()]
    out = run(repr(commands), cwd=tmp_path, code=STARTS_NOTHING)
    outputs = [block.replace("\n    ", "\n") for block in out.split("=== ")[1:]]
    assert len(outputs) == len(commands), out[-3000:]
    for (name, (_, expected)), output in zip(NOTHING_TO_TRAIN.items(), outputs, strict=True):
        assert expected in output, (name, output[-2000:])
    count = outputs[list(NOTHING_TO_TRAIN).index("count")].strip()
    assert count == NOTHING_TO_TRAIN["count"][1]  # count prints its three lines and nothing else
    assert "wandb imported: False" in outputs[-1]
    assert not any(tmp_path.iterdir())  # no data folder, no runs/, no wandb/
