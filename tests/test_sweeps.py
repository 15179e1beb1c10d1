"""W&B sweep examples: the command line an agent builds from each one is accepted by the CLI, and the
values the agent picks reach the model."""

import pytest
import yaml

from lightning_modules.run.cli import ResearchCLI
from tests.conftest import CONFIGS, QUIET, ROOT, make_mnist

SWEEPS = sorted((CONFIGS / "sweeps").glob("*.yaml"))


def agent_command(sweep: dict) -> tuple[list[str], dict]:
    """train.py's arguments as `wandb agent` builds them (`${args}` = `--key=value` per parameter), with the
    first value of each parameter (its minimum for a distribution), and the values picked."""
    picked = {
        key: spec["values"][0] if "values" in spec else spec.get("value", spec.get("min"))
        for key, spec in sweep["parameters"].items()
    }
    args = []
    for item in sweep["command"]:
        if item == "${args}":
            args += [f"--{key}={value}" for key, value in picked.items()]
        elif item not in ("${env}", "${interpreter}", "${program}"):
            args.append(str(CONFIGS.parent / item) if item.startswith("configs/") else item)
    return args, picked


def resolve(model, key: str):
    """The value a dotted config key (model.init_args.x.init_args.y) has in the built model."""
    if key == "model.init_args.optimizer.init_args.lr":
        return model.build_optimizer(model.named_parameters()).param_groups[0]["lr"]
    target = model
    for part in key.split(".")[1:]:
        if part != "init_args":
            target = getattr(target, part)
    return target


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_an_agents_command_line_is_accepted_and_its_values_reach_the_model(path, in_tmp):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "train.py" and (ROOT / sweep["program"]).is_file()
    assert sweep["metric"]["name"] in ("val/err", "val/acc", "val/loss")
    args, picked = agent_command(sweep)
    assert args[0] == "fit"
    cli = ResearchCLI(args=[*args[1:], "--wandb", "false"], run=False)
    for key, value in picked.items():
        if key == "seed_everything":
            assert cli.config.seed_everything == value
        elif key.startswith("data."):
            assert getattr(cli.datamodule, key.split(".")[-1]) == value, key
        else:
            assert resolve(cli.model, key) == pytest.approx(value), key


def test_the_penalty_sweep_is_a_grid_of_penalties_reporting_size_and_error(in_tmp):
    """A search on val/err alone would drive the penalty to its minimum; the grid shows the trade-off."""
    sweep = yaml.safe_load((CONFIGS / "sweeps" / "width_penalty.yaml").read_text())
    penalties = sweep["parameters"]["model.init_args.penalty"]["values"]
    assert sweep["method"] == "grid" and min(penalties) == 0 and max(penalties) >= 100 * min(p for p in penalties if p)
    args, _ = agent_command(sweep)
    data = ["--data.data_dir", str(make_mnist(in_tmp / "data")), "--data.val_size", "16"]
    cli = ResearchCLI(args=[*args[1:], *data, "--trainer.max_epochs", "1", *QUIET], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert {"size/hidden", "val/err"} <= set(cli.trainer.callback_metrics)
