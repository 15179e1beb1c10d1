"""Every subcommand as a user runs it, with the defaults on: W&B (offline here) and the configs' callbacks."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_modules.run.cli import main as cli_main
from lightning_modules.run.config_files import net_from_config
from tests.conftest import CONFIGS, cli, cli_error, make_mnist

QUICKSTART = CONFIGS / "quickstart.yaml"
SHORT = ["--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3"]


def logged_to_wandb(trainer) -> str:
    """The id of the W&B run a run logged to, checked against its folder and its offline files."""
    run_id = (Path(trainer.log_dir) / "wandb_run_id").read_text().strip()
    assert list(Path("wandb").glob(f"offline-run-*-{run_id}/run-*.wandb")), run_id
    return run_id


@pytest.mark.slow
def test_fit_validate_test_and_noise_run_with_wandb_on(in_tmp, capsys):
    fit = cli("fit", "--config", QUICKSTART, *SHORT).trainer
    checkpoint = Path(fit.log_dir) / "checkpoints" / "last.ckpt"
    ids = [logged_to_wandb(fit)]
    for stage in ("validate", "test"):
        evaluated = cli(
            stage, "--config", QUICKSTART, "--ckpt_path", checkpoint, "--trainer.enable_progress_bar", "false"
        )
        assert f"{'val' if stage == 'validate' else 'test'}/acc" in evaluated.trainer.callback_metrics
        ids.append(logged_to_wandb(evaluated.trainer))
    noise = cli("noise", "--config", QUICKSTART, "--checkpoints", checkpoint, "--levels", "[0.0,0.2]")
    assert (Path(noise.trainer.log_dir) / "noise.csv").is_file()  # it used to fail copying the model: W&B's locks
    ids.append(logged_to_wandb(noise.trainer))
    assert len(set(ids)) == 4  # a run of its own each
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_count_search_and_sweep_run_with_wandb_on(in_tmp, capsys):
    cli("count", "--config", QUICKSTART)
    assert "Params: 9.22600E+03" in capsys.readouterr().out
    assert not Path("runs").exists() and not Path("wandb").exists()  # count trains and logs nothing
    search = cli("search", "--config", QUICKSTART, "--upper", "3", "--seeds", "2", "--group_seeds", "true",
                 "--trainer.max_steps", "3", *SHORT[:2]).trainer  # fmt: skip
    assert (Path(search.log_dir) / "results.md").is_file()
    assert "search: the seeds of a depth train together, as one grouped net" in capsys.readouterr().out
    search_id = logged_to_wandb(search)
    trials = [p for p in Path("wandb").glob("offline-run-*/*.wandb") if search_id not in p.name]
    names = sorted(f"quickstart k=3 seed={seed}" for seed in range(4) for t in trials if f"k=3 seed={seed}".encode()
                   in t.read_bytes())  # fmt: skip
    assert names == [f"quickstart k=3 seed={seed}" for seed in range(4)]  # a run each, its seeds trained grouped
    root = make_mnist(in_tmp / "data", n_train=120)
    sweep = cli(
        "sweep", "--config", CONFIGS / "network_size" / "static.yaml", "--data.data_dir", root,
        "--data.download", "false", "--data.val_size", "24", "--grids", "[{width: [8, 16]}]", "--seeds", "2",
        "--epochs", "1",
    ).trainer  # fmt: skip
    assert (Path(sweep.log_dir) / "runs.md").is_file()
    for study in (search, sweep):
        study_id = logged_to_wandb(study)
        trials = [p for p in Path("wandb").glob("offline-run-*") if not p.name.endswith(study_id)]
        assert trials  # and each trial (or stacked seed) a run of its own, beside the study's


@pytest.mark.slow
def test_propagate_runs_with_wandb_on_and_logs_its_tables_and_plots(in_tmp):
    """The tanh net has a mean-field table whose first rows have no measured values (it used to end in W&B's
    TypeError, after the files were written)."""
    root = make_mnist(in_tmp / "data")
    data = ["--data.data_dir", root, "--data.download", "false", "--data.val_size", "16"]
    args = ["--depths", "[6]", "--seeds", "1", "--pairs", "4"]
    propagate = cli("propagate", "--config", CONFIGS / "depth" / "tanh.yaml", *data, *args).trainer
    run_id = logged_to_wandb(propagate)
    (run,) = Path("wandb").glob(f"offline-run-*-{run_id}")
    logged = {p.name for p in (run / "files" / "media").rglob("*.*")}
    for key in ("propagate/predicted", "propagate/depth_scales", "propagate/mean_field", "propagate/tanh"):
        assert any(name.startswith(key.rsplit("/", 1)[-1] + "_") for name in logged), (key, sorted(logged))
    assert (Path(propagate.log_dir) / "propagation.md").is_file()
    propagate.loggers[1].experiment.finish()  # as the process's end would: no run left open for the next test


STUDY_TABLES = {  # each study's W&B tables as they come: a first row with empty cells, kinds mixed in a column
    "propagate/mean_field": [
        {"variant": "tanh", "stage": 0, "q_star": 0.3, "measured_q": "", "measured_c": ""},
        {"variant": "tanh", "stage": 2, "q_star": 0.3, "measured_q": 0.28, "measured_c": 0.91},
    ],
    "propagate/predicted": [
        {"variant": "resnet", "predicted": None, "mean_field_predicted": None},
        {"variant": "tanh", "predicted": 33.0, "mean_field_predicted": float("inf")},
    ],
    "search/deepest": [
        {"variant": "elu", "predicted": "", "deepest": 0, "confirmed": "no depth trained"},
        {"variant": "tanh", "predicted": "33 (27..40)", "deepest": 33, "confirmed": True},
    ],
    "sweep/runs": [{"width": 8, "penalty": "", "val_acc": 0.5}, {"width": 16, "penalty": 0.01, "val_acc": 1}],
    "noise/results": [{"model": "a", "acc@0": "", "noise_score": ""}, {"model": "b", "acc@0": 0.9, "noise_score": 7}],
}


def test_every_studys_tables_reach_wandb_whatever_the_first_row_holds(in_tmp):
    """W&B types a column by its first row: an empty first cell, or text beside numbers, used to end the study in
    a traceback after its files were written."""
    from lightning_modules.run.loggers import RunWandbLogger
    from lightning_modules.run.run_state import new_run_id
    from lightning_modules.studies.study import Study

    logger = RunWandbLogger("offline here", id=new_run_id(), save_dir=str(in_tmp), project="netlab")
    study = Study("study", SimpleNamespace(log_dir=str(in_tmp), default_root_dir=str(in_tmp), loggers=[logger]))
    study.report(tables=STUDY_TABLES, images={})
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    for key, rows in STUDY_TABLES.items():
        (path,) = (run_dir / "files" / "media" / "table" / key.split("/")[0]).glob(f"{key.split('/')[1]}_*.table.json")
        table = json.loads(path.read_text())
        assert table["columns"] == list(rows[0])
        for got, row in zip(table["data"], rows, strict=True):
            for cell, (column, value) in zip(got, row.items(), strict=True):
                expected = None if value in ("", None) else value
                if key == "search/deepest" and column == "confirmed":
                    expected = str(expected)  # a column of booleans and text is text
                if isinstance(expected, float) and math.isinf(expected):
                    assert cell in ("Infinity", float("inf")), (key, column, cell)
                else:
                    assert cell == expected, (key, column, cell)


STATIC = CONFIGS / "network_size" / "static.yaml"
TANH_10K = ["--config", CONFIGS / "depth" / "tanh.yaml", "--config", CONFIGS / "presets" / "mnist_10k.yaml"]
REFUSED = {  # a study that cannot run: its arguments, and the start of its one line
    "missing_data": (["propagate", "--config", CONFIGS / "depth" / "tanh.yaml"], "error: MNIST files missing"),
    "upper": (["search", "--config", QUICKSTART, "--upper", "2"], "error: upper: the search's upper bound"),
    "devices": (
        ["sweep", "--config", STATIC, "--trainer.accelerator", "cpu", "--trainer.devices", "2"],
        "error: sweep runs in one process",
    ),
    "no_test_split": (
        ["noise", *TANH_10K, "--data.test_size", "0", "--checkpoints", "a.ckpt"],
        "error: MNIST with test_file_only: true has no test split",
    ),
    "no_checkpoint": (
        ["noise", "--config", QUICKSTART, "--checkpoints", "a.ckpt"],
        "error: checkpoint a.ckpt not found",
    ),
    "fast_dev_run": (
        ["search", "--config", QUICKSTART, "--upper", "3", "--trainer.fast_dev_run", "true"],
        "error: search does not apply --trainer.fast_dev_run",
    ),
}


@pytest.mark.parametrize("args, message", REFUSED.values(), ids=REFUSED)
def test_a_study_that_refuses_starts_no_wandb_run_and_leaves_nothing(args, message, in_tmp, capsys):
    """W&B starts once a study can run, as a fit's does once its data is set up: a refusal says its one line and
    no `W&B: run ... upload with wandb sync` line for a run that is then deleted."""
    mnist = any("Digits" not in Path(str(arg)).read_text() for arg in args if str(arg).endswith(".yaml"))
    if mnist:  # tiny MNIST files, or none where the refusal is the missing data
        root = in_tmp / "data" if "missing" in message else make_mnist(in_tmp / "data")
        args = [*args, "--data.data_dir", root, "--data.download", "false", "--data.val_size", "16"]
    if "no test split" in message:  # a checkpoint of the config's net, to evaluate on the split it lacks
        net = net_from_config(CONFIGS / "depth" / "tanh.yaml")
        torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, in_tmp / "a.ckpt")
    error = cli_error(*args, capsys=capsys)
    assert error.startswith(message) and "\n" not in error.strip(), error
    assert "W&B" not in capsys.readouterr().out
    assert not Path("runs").exists() and not Path("wandb").exists()


def test_predict_is_no_subcommand_it_would_be_a_traceback(capsys):
    """The datamodules have no prediction data: `predict` used to end in a 47-line traceback."""
    error = cli_error("predict", "--config", QUICKSTART, capsys=capsys)
    assert error.startswith("error: argument subcommand: invalid choice: 'predict' (choose from 'fit', 'validate',")
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert "{fit,validate,test,count,propagate,search,sweep,noise,plasticity,similarity}" in capsys.readouterr().out


def test_evaluating_without_a_checkpoint_and_resuming_a_finished_run_each_say_what_they_did(in_tmp, capsys):
    quiet = ["--wandb", "false", "--trainer.enable_progress_bar", "false"]
    short = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    cli("test", "--config", QUICKSTART, *quiet)
    lines = [line for line in capsys.readouterr().out.splitlines() if "--ckpt_path" in line]
    assert lines == [
        "test: no --ckpt_path, so the net is the untrained one, as initialised; --ckpt_path last tests this config's "
        "newest run"
    ]
    fit = cli("fit", "--config", QUICKSTART, *quiet, *short).trainer
    checkpoint = Path(fit.log_dir) / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    again = cli("fit", "--config", QUICKSTART, *quiet, *short, "--ckpt_path", "last").trainer
    assert again.global_step == fit.global_step == 2  # nothing trained ...
    out = capsys.readouterr().out
    assert (  # ... and it says so
        f"fit: nothing trained: {checkpoint} is at epoch 1, step 2, where this config's training ends "
        "(--trainer.max_epochs 1); raise it to train on"
    ) in out.splitlines()
    cli("validate", "--config", QUICKSTART, *quiet, "--ckpt_path", "last")
    assert "--ckpt_path" not in capsys.readouterr().out  # a trained net: nothing to say
