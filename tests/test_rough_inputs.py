"""Settings a new user brings from other Lightning projects, each answered in one line or honoured: loader
workers, fp16 on a CPU, an extra logger, and the Trainer's own help."""

import warnings
from pathlib import Path

import pytest
from lightning_fabric.loggers import tensorboard
from lightning_utilities.core.imports import RequirementCache

from lightning_modules.run.cli import main
from lightning_modules.run.parse_errors import plain
from tests.conftest import CONFIGS, QUIET, cli, cli_error

QUICKSTART = CONFIGS / "quickstart.yaml"
TWO_BATCHES = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]


def test_loader_workers_for_an_in_memory_datamodule_are_one_line_saying_why(capsys):
    error = cli_error("fit", "--config", QUICKSTART, "--data.num_workers", "2", *QUIET, capsys=capsys)
    first, *rest = error.strip().splitlines()
    assert first.startswith("error: --data: datamodules.Digits takes no num_workers: ")
    assert "in memory" in first and "Union" not in error and "Subtypes" not in error
    assert len(rest) == 1 and rest[0].endswith(" fit --help lists every option)")  # the pointer to --help only


def test_an_argument_a_class_does_not_take_names_the_class_and_the_closest_ones(capsys):
    error = cli_error("fit", "--config", QUICKSTART, "--model.init_args.net.init_args.dept", "9", capsys=capsys)
    assert error.splitlines()[0] == (
        "error: --model.init_args.net: lightning_modules.nets.DepthCNN takes no dept; did you mean depth?"
    )


def test_fp16_on_a_cpu_trains_in_bf16_and_says_so_in_one_line_of_its_own(in_tmp, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = cli("fit", "--config", QUICKSTART, "--trainer.precision", "16-mixed", *TWO_BATCHES, *QUIET).trainer
    assert trainer.precision == "bf16-mixed" and trainer.state.finished
    lines = [line for line in capsys.readouterr().out.splitlines() if "16-mixed" in line]
    assert lines == ["--trainer.precision 16-mixed: fp16 mixed precision needs a GPU; this run trains in bf16-mixed"]
    lightnings = [w for w in caught if "not supported on CPU" in str(w.message)]
    assert not lightnings  # Lightning's own warning of the swap, with its file path


def test_an_added_logger_joins_the_runs_csv_and_wandb_and_the_run_folder_stays_the_runs(in_tmp):
    extra = ["--trainer.logger+=pytorch_lightning.loggers.CSVLogger", "--trainer.logger.save_dir", "elsewhere"]
    trainer = cli("fit", "--config", QUICKSTART, *extra, *TWO_BATCHES, "--trainer.enable_progress_bar", "false")
    trainer = trainer.trainer
    folder = Path(trainer.log_dir)
    assert folder.parent == Path("runs") / "quickstart" and (folder / "metrics.csv").is_file()
    run_id = (folder / "wandb_run_id").read_text()
    assert list(Path("wandb").glob(f"offline-run-*-{run_id}/run-*.wandb"))  # the run's W&B run
    assert [type(logger).__name__ for logger in trainer.loggers] == ["RunCSVLogger", "RunWandbLogger", "CSVLogger"]
    added = Path("elsewhere") / "lightning_logs" / "version_0" / "metrics.csv"
    assert added.read_text() and "val/acc" in added.read_text().splitlines()[0]  # where the user said, logged
    trainer.loggers[1].experiment.finish()
    own_wandb = ["--trainer.logger+=pytorch_lightning.loggers.WandbLogger", "--trainer.logger.project", "mine"]
    validate = cli("validate", "--config", QUICKSTART, *own_wandb, "--trainer.limit_val_batches", "1").trainer
    assert [type(logger).__name__ for logger in validate.loggers] == ["RunCSVLogger", "WandbLogger"]  # theirs only
    assert validate.loggers[1]._wandb_init["project"] == "mine"
    validate.loggers[1].experiment.finish()


@pytest.fixture
def no_tensorboard(monkeypatch):
    """Neither tensorboard nor tensorboardX installed, as Lightning's logger checks it (whatever is installed)."""
    monkeypatch.setattr(tensorboard, "_TENSORBOARD_AVAILABLE", RequirementCache("tensorboard<0"))
    monkeypatch.setattr(tensorboard, "_TENSORBOARDX_AVAILABLE", RequirementCache("tensorboardX<0"))


def test_tensorboard_without_its_package_says_what_to_install(no_tensorboard, in_tmp, capsys):
    extra = ["--trainer.logger+=pytorch_lightning.loggers.TensorBoardLogger", "--trainer.logger.save_dir", "tb"]
    error = cli_error("fit", "--config", QUICKSTART, *extra, *QUIET, capsys=capsys)
    assert error == (
        "error: pytorch_lightning.loggers.TensorBoardLogger needs tensorboard or tensorboardX, neither installed here: "
        "pip install tensorboard"
    )
    assert not any(in_tmp.iterdir())  # nothing started


def test_a_class_that_needs_a_missing_package_is_named_with_it():
    message = (
        "Does not validate against any of the Union subtypes\nSubtypes: [<class 'Logger'>, <class 'bool'>]\n"
        "Errors:\n  - Not a valid subclass of Logger\n    Subclass types expect one of:\n    - a class path (str)\n"
        "  - Problem with given class_path 'pytorch_lightning.loggers.MLFlowLogger':\n"
        "      Requirement 'mlflow>=1.0.0' not met. HINT: Try running `pip install -U 'mlflow>=1.0.0'`\n"
        "  - Expected a <class 'bool'>\nGiven value type: <class 'list'>\nGiven value: [Namespace()]"
    )
    expected = "pytorch_lightning.loggers.MLFlowLogger needs mlflow, not installed here: pip install mlflow"
    assert plain(message) == expected


def test_the_trainers_help_title_is_a_whole_sentence(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    titles = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Lightning's Trainer")]
    assert titles == [
        "Lightning's Trainer with the framework's subcommands: count, propagate, search, sweep, noise, plasticity, "
        "similarity:"
    ]


def test_a_command_builds_its_own_subcommands_parser_and_the_bare_help_lists_every_one(in_tmp, capsys):
    from lightning_modules.run.cli import ResearchCLI

    command = cli("count", "--config", QUICKSTART, *QUIET)
    assert list(command._subcommand_parsers) == ["count"]  # the other nine are half a second of every start
    assert command.subcommands() == ResearchCLI.subcommands()  # the instance's list is whole again
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert all(f"    {name} " in listed for name in ResearchCLI.subcommands())
