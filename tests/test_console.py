"""What a user sees: the project's own lines and the progress bar, libraries' chatter only with --verbose;
W&B offline without a key; and commands that run nothing (help, print_config, count, config errors)
start neither W&B nor data."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, ROOT, child_env

TWO_BATCHES = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"]
LIBRARY_LINES = ("GPU available", "TPU available", "Tip:", "LeafSpec", "log_every_n_steps", "Seed set", "wandb:")


@pytest.mark.slow(16)
@pytest.mark.subprocess
def test_a_fit_without_a_wandb_key_logs_offline_and_prints_the_projects_lines_only(tmp_path):
    """No key, no WANDB_MODE: W&B logs offline and says so in its one line; Lightning's and W&B's own lines
    are not printed; the callbacks' media reach the offline run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(CONFIGS / "quickstart.yaml")]
    command += ["--trainer.callbacks+=callbacks.ActivationStats", "--trainer.max_epochs", "1"]
    command += ["--trainer.enable_progress_bar", "false", *TWO_BATCHES]  # every asserted line comes in two batches
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    for line in LIBRARY_LINES:
        assert line not in out, (line, out[-3000:])
    wandb_lines = [line for line in out.splitlines() if "W&B" in line or "wandb" in line.lower()]
    assert len(wandb_lines) == 1, out[-3000:]
    assert re.match(
        r"W&B: run \w+ offline \(no W&B API key\) in wandb/offline-run-\S+; upload with `wandb sync ", wandb_lines[0]
    )
    assert "dead units (val, epoch 0" in out and "Params: 9.22600E+03" in out  # the project's own lines stay
    assert "Traceback" not in out and "Warning" not in out
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    media = {p.relative_to(tmp_path).as_posix() for p in (tmp_path / "wandb").glob("offline-run-*/files/media/**/*")}
    for key in (
        "images/dead/per_layer",
        "table/dead/table",
        "images/act/variance_histograms",
        "table/act/pca_explained",
    ):
        assert any(f"/media/{key}_" in m for m in media), (key, sorted(media))


TANH = ["--config", str(CONFIGS / "depth" / "tanh.yaml")]
NOTHING_TO_TRAIN = {  # commands that train nothing: (arguments, exit code, what the user must see)
    "help": (["fit", "--help"], 0, "--trainer.max_epochs"),
    "print_config": (["fit", *TANH, "--print_config"], 0, "seed_everything: 0"),
    "count": (
        ["count", *TANH],
        0,
        "Mult-Adds: 1.48058E+05\nParams: 2.95400E+03\nSanity check, parameters: 2.95400E+03",
    ),
    "wrong-key": (["fit", *TANH, "--trainer.max_epoch", "1"], 2, "did you mean --trainer.max_epochs"),
    "config-error": (["fit", *TANH, "--budget", "1000"], 1, "error: --budget needs a net with a `budget` argument"),
    "verbose": (["count", *TANH, "--verbose", "true"], 0, "Params: 2.95400E+03"),  # last: it turns Lightning's lines on
}
STARTS_NOTHING = """
import contextlib, io, sys
from lightning_modules.run.cli import main
commands, sys.argv[1:] = eval(sys.argv[1]), []
for args in commands:
    out, code = io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(args)
        except SystemExit as e:
            code = 1 if isinstance(e.code, str) else e.code or 0
            if isinstance(e.code, str):
                print(e.code)
    print(f"=== {code} " + out.getvalue().strip().replace(chr(10), chr(10) + "    "))
print("wandb imported:", "wandb" in sys.modules)
"""


@pytest.mark.slow(11)
@pytest.mark.subprocess
def test_commands_that_train_nothing_start_neither_wandb_nor_data_and_print_only_their_lines(tmp_path):
    """--help, --print_config, count and config errors, in one process: their exit codes and lines; none imports
    W&B or touches the data; only `--verbose true` lets Lightning's own lines through."""
    commands = [[*args, "--data.data_dir", str(tmp_path / "no-data")] for args, _, _ in NOTHING_TO_TRAIN.values()]
    env = child_env()
    result = subprocess.run(
        [sys.executable, "-c", STARTS_NOTHING, repr(commands)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    blocks = [block.replace("\n    ", "\n") for block in result.stdout.split("=== ")[1:]]
    assert len(blocks) == len(commands), result.stdout[-3000:]
    for (name, (_, code, expected)), block in zip(NOTHING_TO_TRAIN.items(), blocks, strict=True):
        assert block.startswith(f"{code} ") and expected in block, (name, block[-2000:])
    count = blocks[list(NOTHING_TO_TRAIN).index("count")].split(" ", 1)[1].strip()
    assert count == NOTHING_TO_TRAIN["count"][2]  # count prints its three lines and nothing else
    assert "wandb imported: False" in blocks[-1]
    assert result.stderr.count("GPU available") == 1  # Lightning's line, from the --verbose count only
    assert not any(tmp_path.iterdir())  # no data folder, no runs/, no wandb/


def test_a_run_started_beside_an_open_wandb_run_logs_into_its_own(in_tmp, monkeypatch):
    """In a notebook a run left open by an earlier cell is the process's wandb.run: Lightning's logger would
    log the new run into it; ours starts its own."""
    import wandb

    from tests.conftest import cli

    monkeypatch.setenv("WANDB_MODE", "offline")
    # a run of its own even where an earlier test left one open (wandb.init would return that one)
    earlier = wandb.init(
        project="earlier",
        name="left-open",
        dir=str(in_tmp / "earlier"),
        mode="offline",
        reinit="create_new",
    )
    trainer = None
    try:
        args = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
        trainer = cli("fit", "--config", CONFIGS / "quickstart.yaml", *args, "--trainer.enable_progress_bar", "false")
        run = trainer.trainer.loggers[-1].experiment
        assert run.id == (Path(trainer.trainer.log_dir) / "wandb_run_id").read_text() != earlier.id
        assert run.project == "netlab" and earlier.project == "earlier"
    finally:
        if trainer is not None:
            trainer.trainer.loggers[-1].experiment.finish()
        earlier.finish()


LIBRARY_WARNINGS = """
import sys
from lightning_modules.run.cli import main
quick = ["--config", sys.argv[1], "--wandb", "false", "--trainer.enable_progress_bar", "false"]
two = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"]
main(["fit", *quick, *two, "--trainer.max_epochs", "1", "--trainer.precision", "bf16-mixed"])
main(["validate", *quick, "--trainer.limit_val_batches", "2", "--ckpt_path", "runs/quickstart/version_0/checkpoints/last.ckpt"])
main(["search", *quick, "--upper", "3", "--epochs", "1"])
"""


@pytest.mark.slow(15)
@pytest.mark.subprocess
def test_lightnings_warnings_about_itself_stay_off_the_console(tmp_path):
    """A bf16-mixed fit (the model summary), a validate from another run's checkpoint (its dirpath) and a search
    trial of 19 batches (the logging interval): none of Lightning's remarks reaches the user."""
    env = child_env()
    command = [sys.executable, "-c", LIBRARY_WARNINGS, str(CONFIGS / "quickstart.yaml")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for remark in ("model summary", "dirpath has changed", "logging interval", "Warning"):
        assert remark not in result.stderr, (remark, result.stderr[-3000:])
    assert "search quickstart:" in result.stdout  # the runs ran
