"""`train.py` as a user runs it: every config, errors, resuming, seeds, run folders and W&B offline."""

import csv
import re
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import Namespace

from datamodules import Digits
from lightning_modules import Classifier, LossExplodedError, NonFiniteLossError
from lightning_modules.nets import DepthCNN
from lightning_modules.run.cli import ResearchCLI, main, run_name, variant_paths
from lightning_modules.run.config_files import net_from_config
from tests.conftest import (
    CONFIGS,
    QUIET,
    cli,
    cli_error,
    data_args,
    fit_quickstart,
    make_mnist,
    make_speech_commands,
    small_net_args,
    teacher_args,
)

EXPERIMENTS = sorted(
    p
    for p in CONFIGS.rglob("*.yaml")
    if not {"presets", "nets", "variants", "sweeps"} & set(p.parts)
    and p.name != "search_all.yaml"
    and not p.name.startswith("sweep_")
    and "model" in (yaml.safe_load(p.read_text()) or {})  # not a study's arguments (plasticity/interventions.yaml)
)
PRESETS = sorted((CONFIGS / "presets").glob("*.yaml"))
TWO_DDP_RANKS = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_experiment_config_runs_fast_dev_run(config, in_tmp):
    trainer = cli(
        "fit",
        "--config",
        config,
        *data_args(config, in_tmp / "data"),
        *teacher_args(config, in_tmp / "teacher"),
        *small_net_args(config),
        "--trainer.fast_dev_run",
        "true",
        "--data.batch_size",
        "8",
        *QUIET,
    ).trainer
    assert trainer.state.finished and trainer.global_step == 1
    assert not (in_tmp / "runs").exists()  # no run folder (Lightning logs nothing), so no file: none loose in runs/


@pytest.mark.parametrize(
    # ddp, multinode and ray have tests of their own; search_from_prediction, depth_table_gpu and confirm_seeds hold
    # `search` arguments (their tests: tests/test_propagation.py, tests/test_search.py, tests/test_cli.py)
    "preset",
    [
        p
        for p in PRESETS
        if p.stem not in ("ddp", "multinode", "ray", "search_from_prediction", "depth_table_gpu", "confirm_seeds")
    ],  # fmt: skip
    ids=lambda p: p.stem,
)
def test_every_preset_stacks_on_an_experiment(preset, in_tmp):
    data = yaml.safe_load(preset.read_text()).get("data") or {}
    data_class = data.get("class_path", "")
    experiment, args = CONFIGS / "quickstart.yaml", []
    words = (data.get("init_args") or {}).get("words")
    if words:  # a Speech Commands preset goes on a k-winners GSC experiment, with folders of its words
        experiment = CONFIGS / "kwinners" / "gsc_sparse.yaml"
        root = make_speech_commands(in_tmp / "speech", clips=3, words=(*words, "bed"))
        args = ["--data.data_dir", str(root)]
    elif "MNIST" in data_class:  # tiny files in the folder of the preset's dataset (MNIST/ or FashionMNIST/)
        root = make_mnist(in_tmp / "data", folder=data_class.rsplit(".", 1)[-1])
        args = ["--data.data_dir", str(root), "--data.download", "false", "--data.val_size", "16"]
        args += ["--data.test_size", "8"] if (data.get("init_args") or {}).get("test_size") else []
    elif "CIFAR10" in data_class:  # a CIFAR-10 preset goes on a CIFAR-10 experiment
        experiment, args = (
            CONFIGS / "dead_units" / "model4.yaml",
            data_args(CONFIGS / "dead_units" / "model4.yaml", in_tmp),
        )
    trainer = cli(
        "fit",
        "--config",
        experiment,
        "--config",
        preset,
        *args,
        "--trainer.fast_dev_run",
        "true",
        "--data.batch_size",
        "8",
        *QUIET,
    ).trainer
    if words:
        assert trainer.datamodule.classes == ("unknown", "silence", *words)
    if "CIFAR10" in data_class:
        assert trainer.datamodule.augment.crop_padding == 4 and trainer.datamodule.augment.cutout == 16
    assert trainer.state.finished and not (in_tmp / "runs").exists()


def test_ddp_preset_parses(capsys):
    config = cli_config(
        "--config", CONFIGS / "quickstart.yaml", "--config", CONFIGS / "presets" / "ddp.yaml", capsys=capsys
    )
    assert config["trainer"]["strategy"] == "ddp" and config["trainer"]["devices"] == -1


def test_multinode_preset_parses(capsys):
    preset = CONFIGS / "presets" / "multinode.yaml"
    config = cli_config("--config", CONFIGS / "quickstart.yaml", "--config", preset, capsys=capsys)
    assert config["trainer"]["strategy"] == "ddp" and config["trainer"]["num_nodes"] == 2
    assert config["trainer"]["devices"] == 4


def cli_config(*args, capsys) -> dict:
    """The resolved config `train.py fit ARGS --print_config` prints (in-process)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *map(str, args), "--print_config"])
    assert exit_info.value.code in (None, 0)
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_shows_the_resolved_config(capsys):
    config = cli_config("--config", CONFIGS / "depth" / "resnet.yaml", capsys=capsys)
    net = config["model"]["init_args"]["net"]["init_args"]
    assert net["depth"] == 447 and net["residual"] is True and config["checkpoint"]["monitor"] == "val/err"


@pytest.mark.parametrize(
    "config, folder",
    [
        ("depth/tanh.yaml", Path("data") / "MNIST" / "raw"),
        ("dead_units/model4.yaml", Path("data") / "cifar-10-batches-py"),
    ],
)
def test_missing_data_is_one_clear_line(config, folder, in_tmp, capsys):
    error = cli_error(
        "fit", "--config", CONFIGS / config, "--data.download", "false", "--wandb", "false", capsys=capsys
    )
    assert error.startswith("error:") and "\n" not in error and str(folder) in error


def test_corrupt_data_is_one_clear_line(tiny_mnist, in_tmp, capsys):
    (tiny_mnist / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    error = cli_error(
        "fit", "--config", CONFIGS / "depth" / "tanh.yaml", "--data.data_dir", tiny_mnist, "--wandb", "false",
        capsys=capsys,
    )  # fmt: skip
    assert error.startswith("error:") and "train-labels-idx1-ubyte.gz" in error and "\n" not in error
    assert not (in_tmp / "runs").exists()  # the run failed before training: no empty run folder left


def test_val_size_too_large_is_one_clear_line(in_tmp, capsys):
    error = cli_error(
        "fit", "--config", CONFIGS / "quickstart.yaml", "--data.val_size", "5000", "--wandb", "false", capsys=capsys
    )
    assert error.startswith("error: val_size=5000 must be between 1 and 1499")


def test_run_folder_holds_config_checkpoints_and_metrics_per_run(in_tmp):
    first, second = fit_quickstart(), fit_quickstart()
    folders = [Path(t.log_dir) for t in (first, second)]
    assert folders[0] != folders[1] and folders[0].resolve().parent == in_tmp / "runs" / "quickstart"
    for folder in folders:
        assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
        assert any(p.name.startswith("epoch000-err") for p in (folder / "checkpoints").iterdir())
        assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["max_epochs"] == 1
        hparams = yaml.safe_load((folder / "hparams.yaml").read_text())
        assert hparams["complexity/params"] == sum(p.numel() for p in first.lightning_module.net.parameters())


def test_checkpoints_load_with_weights_only_and_resume(in_tmp):
    first = fit_quickstart()
    last = Path(first.log_dir) / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)  # no pickled objects: plain state and primitives
    assert checkpoint["epoch"] == 0
    resumed = fit_quickstart("--ckpt_path", last, "--trainer.max_epochs", "2")
    assert resumed.current_epoch == 2 and resumed.global_step == 2 * first.global_step


def test_last_ckpt_is_the_last_epoch_even_when_the_best_is_earlier(in_tmp):
    # monitoring `epoch` in min mode makes epoch 0 the best for ever: Lightning's own save_last would then
    # never rewrite last.ckpt after epoch 0
    trainer = fit_quickstart("--trainer.max_epochs", "3", "--checkpoint.monitor", "epoch")
    folder = Path(trainer.log_dir) / "checkpoints"
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == 2
    (best,) = folder.glob("epoch*.ckpt")
    assert torch.load(best, weights_only=True)["epoch"] == 0


def epoch_metrics(trainer) -> list[dict]:
    rows = list(csv.DictReader(open(Path(trainer.log_dir) / "metrics.csv")))
    return [{k: v for k, v in row.items() if k.startswith(("train/", "val/"))} for row in rows]


@pytest.mark.slow
def test_same_seed_same_metrics(in_tmp):
    a, b = fit_quickstart(), fit_quickstart()
    assert epoch_metrics(a) == epoch_metrics(b) and any(row.get("val/err") for row in epoch_metrics(a))
    c = fit_quickstart("--seed_everything", "1")
    assert epoch_metrics(c) != epoch_metrics(a)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_checkpoints(in_tmp, capsys):
    model = Classifier(DepthCNN(depth=3), optimizer=partial(torch.optim.SGD, lr=1e38), finite_check_every=2)
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, default_root_dir=in_tmp)
    with pytest.raises(NonFiniteLossError, match="NaN or infinite"):
        trainer.fit(model, datamodule=Digits(batch_size=64))
    error = cli_error(
        "fit", "--config", CONFIGS / "quickstart.yaml", "--model.init_args.optimizer.init_args.lr", "1e38", *QUIET,
        capsys=capsys,
    )  # fmt: skip
    assert error.startswith("error: the training loss became NaN or infinite") and "\n" not in error


def exploding(on_divergence: str = "stop", **guard) -> Classifier:
    """The quickstart's batch-norm ResNet at lr 1e6: the loss grows to 1e21-1e31 and stays finite."""
    net = DepthCNN(depth=9, activation="elu", batch_norm=True, residual=True)
    optimizer = partial(torch.optim.SGD, lr=1e6, momentum=0.9)
    return Classifier(net, optimizer=optimizer, on_divergence=on_divergence, **guard)


@pytest.mark.slow
def test_an_exploding_loss_stops_with_a_clear_error_or_warns_once(in_tmp, capsys):
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(LossExplodedError, match=r"the training loss exploded to .* past 1000x its first value"):
        trainer.fit(exploding(), datamodule=Digits(batch_size=64))
    assert trainer.current_epoch == 0  # stopped in the first epoch, not after the whole run
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(exploding("warn"), datamodule=Digits(batch_size=64))
    assert trainer.current_epoch == 2 and capsys.readouterr().out.count("warning: the training loss exploded") == 1
    calm = Classifier(DepthCNN(depth=3), max_loss_ratio=None, max_loss=0.5)  # a bound: even a normal loss is past it
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(LossExplodedError, match="past the bound 0.5"):
        trainer.fit(calm, datamodule=Digits(batch_size=64))
    error = cli_error(
        "fit", "--config", CONFIGS / "quickstart.yaml", "--model.init_args.optimizer.init_args.lr", "1e6", *QUIET,
        capsys=capsys,
    )  # fmt: skip
    assert error.startswith("error: the training loss exploded to") and "\n" not in error


def test_search_counts_an_exploded_trial_as_diverged_and_says_when_no_depth_trains(in_tmp, capsys):
    lr = ["--model.init_args.optimizer.init_args.lr", "1e6"]
    cli("search", "--config", CONFIGS / "quickstart.yaml", *lr, "--upper", "3", "--trainer.max_steps", "25", *QUIET)
    out = capsys.readouterr().out
    assert "  quickstart k=   3 seed=0: diverged" in out
    assert "search quickstart: no depth trainable: k = 3 diverged" in out and "deepest trainable" not in out


def test_a_run_that_fails_before_training_leaves_no_folder_and_no_wandb_run(tiny_mnist, in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tiny_mnist / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    error = cli_error("fit", "--config", CONFIGS / "depth" / "tanh.yaml", "--data.data_dir", tiny_mnist, capsys=capsys)
    assert error.startswith("error:") and "train-labels-idx1-ubyte.gz" in error and "\n" not in error.strip()
    assert sorted(p.name for p in in_tmp.iterdir()) == ["data"]  # no runs/, no wandb/


def test_search_subcommand_writes_its_table(in_tmp, capsys):
    cli(
        "search",
        "--config",
        CONFIGS / "quickstart.yaml",
        "--upper",
        "6",
        "--epochs",
        "1",
        "--seeds",
        "2",
        "--trainer.max_steps",
        "2",
        *QUIET,
    )
    folder = in_tmp / "runs" / "quickstart" / "version_0"
    rows = list(csv.DictReader((folder / "results.csv").open()))
    # two steps cannot reach 80% accuracy: k = 3 fails with seeds 0 and 1 (the config's seed_everything is 0),
    # and the confirmation trains it again with the fresh seeds 2 and 3; k = 6 is never probed
    trials = [(r["depth"], r["seed"], r["phase"], r["trainable"]) for r in rows]
    assert trials == [("3", "0", "search", "False"), ("3", "1", "search", "False")] + [
        ("3", seed, "confirm", "False") for seed in ("2", "3")
    ]
    mean = sum(float(r["val_err"]) for r in rows[:2]) / 2
    out = capsys.readouterr().out
    assert f"search quickstart: no depth trainable: k = 3 has val err {mean:.2f}" in out
    assert "search: the seeds of a depth train one at a time" in out
    assert (folder / "results.md").is_file() and (folder / "error_vs_depth.png").is_file()


def test_a_finished_search_is_confirmed_with_more_seeds_from_its_trials(in_tmp, capsys):
    """`--trials_from` takes the trials an earlier search of the same training has, and trains only the others:
    here the two fresh confirmation seeds a search of 1 seed lacks, each as a search with 3 from the start trains it."""
    search = ["search", "--config", CONFIGS / "quickstart.yaml", "--upper", "6", "--trainer.max_steps", "2",
              "--max_error", "0.95", *QUIET]  # fmt: skip
    runs = in_tmp / "runs" / "quickstart"
    cli(*search)  # k = 3 and 6 train (error below 95%), the confirmation trains 6 again with seed 1
    capsys.readouterr()
    preset = ["--config", CONFIGS / "presets" / "confirm_seeds.yaml"]  # confirm_seeds: 3
    cli(*search, *preset, "--trials_from", runs / "version_0", "--name", "confirmed")
    out = capsys.readouterr().out
    assert f"search: 3 trial(s) taken from {runs / 'version_0'}, not trained again" in out
    assert "search: 2 trial(s) trained" in out
    cli(*search, "--confirm_seeds", "3")  # the same search, every trial trained
    confirmed = in_tmp / "runs" / "confirmed" / "version_0" / "results.csv"  # under another name: the same net's
    rows = [list(csv.DictReader(path.open())) for path in (confirmed, runs / "version_1" / "results.csv")]
    assert {r["variant"] for r in rows[0]} == {"confirmed"}
    key = ("depth", "seed", "phase", "train_err", "val_err", "trainable")
    assert [[r[k] for k in key] for r in rows[0]] == [[r[k] for k in key] for r in rows[1]]
    assert sorted((r["depth"], r["seed"]) for r in rows[0] if r["phase"] == "confirm") == [
        ("6", "1"), ("6", "2"), ("6", "3")
    ]  # fmt: skip
    error = cli_error(*search, "--trainer.max_steps", "3", "--trials_from", runs / "version_0", capsys=capsys)
    assert error == (
        f"error: --trials_from {runs / 'version_0'}: that search trained its trials otherwise (it differs in "
        "trainer.max_steps)"
    )
    (runs / "version_0" / "config.yaml").unlink()
    error = cli_error(*search, "--trials_from", runs / "version_0", capsys=capsys)
    assert error == f"error: --trials_from {runs / 'version_0'}: no config.yaml there (a search's run folder has both)"
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]  # refused: no folder


def test_search_all_names_every_variant_with_its_bound():
    variants = yaml.safe_load((CONFIGS / "depth" / "search_all.yaml").read_text())["variants"]
    assert len(variants) == 8  # the spec's seven and tanh with delta-orthogonal init
    for path, upper in variants.items():
        net = net_from_config(CONFIGS / "depth" / path)  # beside search_all.yaml
        assert isinstance(net, DepthCNN) and net.settings["depth"] <= upper


def test_a_search_over_variants_is_named_for_its_file_and_finds_them_beside_it_from_anywhere(
    tmp_path, monkeypatch, capsys
):
    """Run from another folder: the variants resolve against search_all.yaml, and the run is runs/depth/search_all."""
    monkeypatch.chdir(tmp_path)
    configs = [CONFIGS / "depth" / "resnet.yaml", CONFIGS / "depth" / "search_all.yaml"]
    variants = yaml.safe_load(configs[1].read_text())["variants"]
    config = Namespace(config=configs, name=None, variants=variants)
    names = ("tanh", "tanh_init", "elu", "elu_bn", "resnet", "tanh_bn", "resnet_nobn", "tanh_delta_orthogonal")
    assert variant_paths(config) == {str(CONFIGS / "depth" / f"{n}.yaml"): variants[f"{n}.yaml"] for n in names}
    assert run_name(config) == "depth/search_all"
    mine = tmp_path / "mine.yaml"
    mine.write_text("variants:\n  nowhere.yaml: 24\n")
    args = ["search", "--config", configs[0], "--config", mine, "--wandb", "false"]
    assert cli_error(*args, capsys=capsys) == (
        f"error: search variant nowhere.yaml: no such config file (beside {mine} or in the working directory)"
    )


@pytest.mark.parametrize(
    "path,name",
    [
        ("configs/depth/resnet.yaml", "depth/resnet"),
        ("/a/configs/b/configs/quickstart.yaml", "quickstart"),
        ("x/my.yaml", "my"),
    ],
)
def test_run_name_is_the_config_path_under_configs(path, name):
    from lightning_modules.run.config_files import config_name

    assert config_name(path) == name


def test_budget_flag_picks_the_substitutes_hyperparameter(capsys):
    config = CONFIGS / "compression" / "students" / "tensor_train.yaml"
    cli("count", "--config", config, "--budget", "7e5", "--model.init_args.net.init_args.depth", "10")
    out = capsys.readouterr().out
    chosen = out.split("conv ")[1].split()[0]
    assert chosen.startswith("TensorTrain_") and "budget 700,000 parameters" in out
    params = int(out.split(" gives ")[1].split()[0].replace(",", ""))
    assert 0.98 * 7e5 <= params <= 7e5 and f"Params: {params:.5E}" in out
    with pytest.raises(SystemExit, match="--budget needs a net with a `budget` argument"):
        main(["count", "--config", str(CONFIGS / "quickstart.yaml"), "--budget", "7e5"])


@pytest.mark.slow
def test_original_steps_preset_trains_a_fixed_number_of_steps(in_tmp, capsys):
    preset = ["--config", CONFIGS / "presets" / "original_steps.yaml"]
    config = yaml.safe_load((CONFIGS / "presets" / "original_steps.yaml").read_text())
    assert config["trainer"]["max_steps"] == 705  # 3 epochs of 60,000 images at batch 256: 3 x 235
    trainer = fit_quickstart(*preset, "--trainer.max_steps", "30", "--trainer.limit_train_batches", "4")
    assert trainer.global_step == 30 and trainer.current_epoch >= 7  # past the config's 1 epoch: steps decide
    cli("search", "--config", CONFIGS / "quickstart.yaml", *preset, "--trainer.max_steps", "3", "--upper", "3", *QUIET)
    assert "search quickstart: k in 3..3, 1 seed(s) per depth, 3 steps" in capsys.readouterr().out


def test_an_abbreviated_or_misspelt_key_is_refused_in_one_short_line(tmp_path, capsys):
    quick = CONFIGS / "quickstart.yaml"
    error = cli_error("fit", "--config", quick, "--trainer.max_epoch", "1", "--wandb", "false", capsys=capsys)
    assert error.startswith("error: unrecognized arguments: --trainer.max_epoch 1; did you mean --trainer.max_epochs")
    assert len(error.strip().splitlines()) == 2 and "usage" not in error  # the usage is left to --help
    bad = tmp_path / "bad.yaml"
    bad.write_text(quick.read_text().replace("max_epochs", "max_epoch"))
    error = cli_error("fit", "--config", bad, "--wandb", "false", capsys=capsys)
    assert "'trainer.max_epoch'" in error and "did you mean --trainer.max_epochs" in error
    assert len(error.strip().splitlines()) == 2


def write_bad_checkpoints(folder: Path) -> dict[str, Path]:
    good = folder / "good.ckpt"
    torch.save({"state_dict": {"net.x": torch.zeros(100)}, "epoch": 0}, good)
    paths = {name: folder / f"{name}.ckpt" for name in ("garbage", "truncated", "pickled", "hello", "run-id")}
    paths["garbage"].write_text("not a checkpoint")
    paths["hello"].write_text("hello\n")  # `echo hello > bad.ckpt`: read as a pickle, a KeyError
    paths["run-id"].write_text("khsyl2uj")  # a run folder's wandb_run_id
    paths["truncated"].write_bytes(good.read_bytes()[:200])
    torch.save({"state_dict": Path("x")}, paths["pickled"])
    paths["newer"] = folder / "newer.ckpt"
    torch.save({"state_dict": {"net.x": torch.zeros(1)}, "pytorch-lightning_version": "99.1.0"}, paths["newer"])
    return {**paths, "other-net": good, "missing": folder / "missing.ckpt"}


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing", "not found"),
        ("garbage", "is not a PyTorch checkpoint"),
        ("hello", "is not a PyTorch checkpoint"),
        ("run-id", "is not a PyTorch checkpoint"),
        ("truncated", "truncated, corrupt or not a PyTorch checkpoint"),
        ("pickled", "holds Python objects besides tensors and plain values"),
        ("other-net", r"is not of this config's model: weights 65 missing \(net.features.0.conv.bias, "),
        (
            "newer",
            rf"was written by PyTorch Lightning 99.1.0, newer than this environment's {re.escape(pl.__version__)}:",
        ),
    ],
)
def test_a_bad_ckpt_path_is_one_line_naming_the_file(name, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_bad_checkpoints(tmp_path)[name]
    error = cli_error(
        "fit", "--config", CONFIGS / "quickstart.yaml", "--ckpt_path", path, "--wandb", "false", capsys=capsys
    )
    assert error.startswith(f"error: checkpoint {path} ") and re.search(message, error), error
    assert "\n" not in error and "weights_only" not in error and "Traceback" not in error


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["search", "--upper", "3", "--trainer.limit_train_batches", "2"],
            "search does not apply --trainer.limit_train_batches",
        ),
        (
            ["search", "--upper", "3", "--trainer.accumulate_grad_batches", "2"],
            "search does not apply --trainer.accumulate_grad_batches",
        ),
        (
            ["search", "--upper", "3", "--trainer.gradient_clip_val", "1"],
            "search does not apply --trainer.gradient_clip_val",
        ),
        (
            ["noise", "--checkpoints", "x.ckpt", *TWO_DDP_RANKS],
            "noise runs in one process (it evaluates on one device)",
        ),
        (["search", "--upper", "3", *TWO_DDP_RANKS], "search runs in one process"),
    ],
    ids=["limit_train_batches", "accumulate", "clip", "noise_ddp", "search_ddp"],
)
def test_study_settings_the_trainings_would_ignore_are_refused(args, message, in_tmp, capsys):
    error = cli_error(*args[:1], "--config", CONFIGS / "quickstart.yaml", *args[1:], "--wandb", "false", capsys=capsys)
    assert error.startswith(f"error: {message}") and "\n" not in error.strip()


def test_a_sweep_refuses_settings_its_stacks_would_ignore(tiny_mnist, in_tmp, capsys):
    sweep = ["sweep", "--config", CONFIGS / "network_size" / "static.yaml", "--data.data_dir", tiny_mnist]
    sweep += ["--data.val_size", "16", "--wandb", "false"]
    error = cli_error(*sweep, "--trainer.precision", "bf16-mixed", capsys=capsys)
    assert error == "error: sweep does not apply --trainer.precision to its trainings: unset it"
    error = cli_error(*sweep, "--data.first_epoch_batch_size", "4", capsys=capsys)
    assert error == "error: sweep trains every epoch at data.batch_size: unset data.first_epoch_batch_size"


@pytest.mark.parametrize("config", sorted((CONFIGS / "dead_units").glob("model*.yaml")), ids=lambda p: p.stem)
def test_the_cifar10_configs_give_the_originals_figures_as_the_originals(config):
    """No CIFAR-10 run of this project stands behind them: the header must not read as a measurement."""
    header = "".join(line for line in config.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "Expect" not in header and "not run by this project" in header


def test_an_error_after_the_progress_bar_starts_on_a_line_of_its_own(in_tmp, capsys):
    """The bar's line has no newline until the bar closes: a run stopped by an error closes it first."""
    bar = ["--trainer.enable_progress_bar", "true", "--trainer.enable_model_summary", "false", "--wandb", "false"]
    lr = ["--model.init_args.optimizer.init_args.lr", "1e6"]
    error = cli_error("fit", "--config", CONFIGS / "quickstart.yaml", *lr, *bar, capsys=capsys)
    assert error.startswith("error: the training loss exploded to")
    out = capsys.readouterr().out
    assert "Epoch 0" in out and out.endswith("\n")  # the bar's last line is finished before the error is printed


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--data.batch_size", "-4"], "error: batch_size must be positive, got -4"),
        (["--data.val_size", "0"], "error: val_size must be positive, got 0"),
        (["--model.init_args.finite_check_every", "0"], "error: finite_check_every must be positive, got 0"),
        (["--model.init_args.net.init_args.depth", "10"], "error: depth must be a positive multiple of 3, got 10"),
        (
            ["--trainer.accumulate_grad_batches", "0"],
            "error: --trainer.accumulate_grad_batches must be positive, got 0",
        ),
        (
            ["--trainer.check_val_every_n_epoch", "0"],
            "error: --trainer.check_val_every_n_epoch must be positive, got 0",
        ),
        (
            ["--trainer.accelerator", "gpu"],
            "error: --trainer.accelerator gpu: no GPU is visible here (torch.cuda.is_available() is False); "
            "train on the CPU with --trainer.accelerator cpu",
        ),
        (["--trainer.devices", "-3"], "error: trainer: `devices` selected with `CPUAccelerator` should be an int > 0."),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_a_value_out_of_range_is_one_line(args, expected, in_tmp, capsys):
    if args[:2] == ["--trainer.accelerator", "gpu"] and torch.cuda.is_available():
        pytest.skip("a GPU is visible: the setting is valid here")
    error = cli_error("fit", "--config", CONFIGS / "quickstart.yaml", *args, "--wandb", "false", capsys=capsys)
    assert error.strip() == expected
    assert not (in_tmp / "runs").exists()  # refused before anything ran


def test_a_search_bound_below_the_shallowest_depth_is_one_line(in_tmp, capsys):
    error = cli_error(
        "search", "--config", CONFIGS / "quickstart.yaml", "--upper", "2", "--wandb", "false", capsys=capsys
    )
    assert error == "error: upper: the search's upper bound must be at least 3 (the shallowest depth), got 2"


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--model.class_path", "lightning_modules.Clasifier"],
            "--model: no class lightning_modules.Clasifier; did you mean lightning_modules.Classifier?",
        ),
        (
            ["--model.init_args.net.class_path", "lightning_modules.nets.DepthCN"],
            "--model.init_args.net: no class lightning_modules.nets.DepthCN; did you mean lightning_modules.nets.DepthCNN?",
        ),
        (
            ["--trainer.callbacks+=callbacks.DeadUnit"],
            "--trainer.callbacks: no class callbacks.DeadUnit; did you mean callbacks.DeadUnits?",
        ),
        (
            ["--model.class_path", "lightning_module.Classifier"],
            "--model: no module lightning_module (class_path lightning_module.Classifier); did you mean lightning_modules",
        ),
        (["--data.batch_size", "abc"], "--data.init_args.batch_size: 'abc' is not an int"),
        (["--trainer.max_epochs", "1.5"], "--trainer.max_epochs: '1.5' is not an int or null"),
        (["--model.init_args.max_loss_ratio", "abc"], "--model.init_args.max_loss_ratio: 'abc' is not a float or null"),
        (
            ["--model.init_args.net.init_args.activation", "foo"],
            "--model.init_args.net.init_args.activation: 'foo' is not one of 'tanh', 'elu', 'relu'",
        ),
        (
            ["--model.init_args.optimizer.init_args.lr", "abc"],
            "--model.init_args.optimizer.init_args.lr: 'abc' is not a float or a Tensor",
        ),
    ],
    ids=["class", "net_class", "callback_class", "module", "int", "int_or_null", "float_or_null", "literal", "lr"],
)
def test_a_misspelt_class_or_a_value_of_the_wrong_type_is_said_in_the_users_terms(args, expected, capsys):
    error = cli_error("fit", "--config", CONFIGS / "quickstart.yaml", *args, "--wandb", "false", capsys=capsys)
    first, second = error.strip().splitlines()
    assert first.startswith(f"error: {expected}") and "Union" not in error and second.endswith("lists every option)")


CLASSIFIER_SETTINGS = {  # every Classifier setting but net/optimizer/scheduler, at a value other than its default
    "num_classes": ("12", 12),
    "channels_last": ("false", False),
    "finite_check_every": ("7", 7),
    "param_groups": ("{'*.bias': {weight_decay: 0.0}}", {"*.bias": {"weight_decay": 0.0}}),
    "max_loss_ratio": ("50", 50.0),
    "max_loss": ("1e6", 1e6),
    "on_divergence": ("warn", "warn"),
    "recycle": ("{every_n_steps: 40, tau: 0.05}", None),
}


@pytest.mark.parametrize(
    "config, module",
    [
        ("quickstart.yaml", "lightning_modules.Classifier"),
        ("compression/mnist_teacher.yaml", "lightning_modules.Compressed"),
        ("compression/mnist_student.yaml", "lightning_modules.Student"),
        ("network_size/flexible.yaml", "lightning_modules.LearnedSize"),
    ],
    ids=lambda v: v.rsplit(".", 1)[-1] if v.startswith("lightning") else None,
)
def test_every_lightning_module_takes_every_classifier_setting_from_the_command_line(config, module):
    """One signature: the divergence guard that the divergence error tells users to set works on every module."""
    args = ["--config", str(CONFIGS / config), "--model.class_path", module, "--wandb", "false"]
    for key, (text, _) in CLASSIFIER_SETTINGS.items():
        args += [f"--model.init_args.{key}", text]
    model = ResearchCLI(args=args, run=False).model
    assert type(model).__name__ == module.rsplit(".", 1)[-1]
    assert Classifier.__init__.__code__.co_varnames[1 : 1 + 3 + len(CLASSIFIER_SETTINGS)] == (
        "net",
        "optimizer",
        "scheduler",
        *CLASSIFIER_SETTINGS,
    )  # fmt: skip (a new Classifier setting must be added above)
    assert model.hparams["num_classes"] == 12 and model.channels_last is False and model.finite_check_every == 7
    assert model.param_groups == {"*.bias": {"weight_decay": 0.0}}
    assert (model.max_loss_ratio, model.max_loss, model.on_divergence) == (50.0, 1e6, "warn")
    assert (model.recycle.every_n_steps, model.recycle.tau) == (40, 0.05)
