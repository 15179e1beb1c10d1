"""Every subcommand as a user runs it, with the defaults on: W&B (offline here) and the configs' callbacks."""

from pathlib import Path

import pytest

from tests.conftest import CONFIGS, cli, make_mnist

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
    search = cli("search", "--config", QUICKSTART, "--upper", "3", "--trainer.max_steps", "3", *SHORT[:2]).trainer
    assert (Path(search.log_dir) / "results.md").is_file()
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
    propagate = cli("propagate", "--config", QUICKSTART, "--depths", "[6]", "--seeds", "1", "--pairs", "4").trainer
    run_id = logged_to_wandb(propagate)
    (run,) = Path("wandb").glob(f"offline-run-*-{run_id}")
    logged = {p.name for p in (run / "files" / "media").rglob("*.*")}
    for key in ("propagate/predicted", "propagate/depth_scales", "propagate/quickstart"):
        assert any(name.startswith(key.rsplit("/", 1)[-1] + "_") for name in logged), (key, sorted(logged))
    assert (Path(propagate.log_dir) / "propagation.md").is_file()
