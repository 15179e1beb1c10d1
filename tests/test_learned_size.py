"""MLP, parameter groups and LearnedSize: penalties, size logging, pruning during fit, resuming a pruned run."""

import csv
import types

import pytest
import torch

from lightning_modules import ConfigError, LearnedSize
from lightning_modules.classifier import param_groups
from lightning_modules.nets import MLP
from tests.conftest import CONFIGS, QUIET, cli, make_mnist


@pytest.mark.parametrize("layer", ["static", "flexible", "sparsifier"])
def test_mlp_layers_share_one_interface(layer):
    torch.manual_seed(0)
    net = MLP(width=32, layer=layer)
    x = torch.randn(5, 1, 28, 28)
    assert net(x).shape == (5, 10)
    pre, post = net.hidden_activations(x)
    assert pre.shape == post.shape == (5, 32) and (post >= 0).all()
    assert net.sizes()["hidden"].item() == 32
    assert net.penalty().item() == ({"static": 0, "flexible": pytest.approx(32, abs=1), "sparsifier": 32}[layer])
    other = net.variant(width=16)
    assert other.width == 16 and other.layer == layer and other(x).shape == (5, 10)


def test_mlp_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="unknown layer"):
        MLP(layer="dense")
    with pytest.raises(ValueError, match="start_size"):
        MLP(layer="static", start_size=8)
    with pytest.raises(ValueError, match="no argument"):
        MLP().variant(depth=3)
    assert MLP(64, "flexible", start_size=8).sizes()["hidden"].item() == 8  # the configured start, not the width


def test_param_groups_take_the_first_matching_pattern():
    net = MLP(8, "flexible", start_size=4)
    named = [(f"net.{n}", p) for n, p in net.named_parameters()]
    groups = param_groups(named, {"*.x0": {"lr": 0.5}, "*.bias": {"weight_decay": 0.0}, "*": {"weight_decay": 1e-3}})
    by_option = {
        tuple(sorted((k, v) for k, v in g.items() if k not in ("params", "name"))): g["params"] for g in groups
    }
    # named for their pattern, in the order their first parameter is met (x0 is the net's first)
    assert [g["name"] for g in groups] == ["*.x0", "*", "*.bias"]
    assert by_option[(("lr", 0.5),)] == [net.hidden.x0]
    assert {id(p) for p in by_option[(("weight_decay", 0.0),)]} == {id(net.hidden.linear.bias), id(net.out.bias)}
    assert {id(p) for p in by_option[(("weight_decay", 1e-3),)]} == {id(net.hidden.linear.weight), id(net.out.weight)}


def test_size_parameters_are_not_decayed_unless_asked():
    model = LearnedSize(
        MLP(8, "flexible", start_size=4),
        optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1),
        param_groups={"*": {"weight_decay": 0.5}, "*.x0": {"lr": 0.2}},
    )
    optimizer = model.configure_optimizers()
    x0_group = next(g for g in optimizer.param_groups if any(p is model.net.hidden.x0 for p in g["params"]))
    assert x0_group["weight_decay"] == 0.0 and x0_group["lr"] == 0.2
    rest = next(g for g in optimizer.param_groups if any(p is model.net.out.weight for p in g["params"]))
    assert rest["weight_decay"] == 0.5
    with pytest.raises(TypeError, match="sized layer"):
        LearnedSize(torch.nn.Linear(3, 2))


def test_pruning_refuses_ddp_with_a_clear_error():
    model = LearnedSize(MLP(8, "sparsifier"))
    model._trainer = types.SimpleNamespace(world_size=2)
    with pytest.raises(ConfigError, match="prune_every_n_epochs: null"):
        model.setup("fit")
    LearnedSize(MLP(8, "sparsifier"), prune_every_n_epochs=None).setup("fit")  # masked only: fine


def sparsifier_cli(subcommand: str, root, *extra):
    return cli(
        subcommand,
        "--config",
        CONFIGS / "network_size" / "sparsifier.yaml",
        "--data.data_dir",
        root,
        "--data.download",
        "false",
        "--data.val_size",
        "16",
        "--data.batch_size",
        "16",
        "--model.init_args.net.init_args.width",
        "64",
        "--model.init_args.penalty",
        "0.05",
        "--model.init_args.optimizer.init_args.lr",
        "0.1",  # with the penalty, strong enough that units die within the 15 steps
        *QUIET,
        *extra,
    ).trainer


def test_sparsifier_fit_prunes_for_real_logs_sizes_and_resumes(in_tmp):
    root = make_mnist(in_tmp / "data")
    trainer = sparsifier_cli("fit", root, "--trainer.max_epochs", "3")
    net = trainer.lightning_module.net
    width = net.hidden.linear.out_features
    assert 0 < width < 64 and net.out.weight.shape == (10, width) and net.hidden.liveness.shape == (width,)
    folder = trainer.log_dir
    rows = [r for r in csv.DictReader(open(f"{folder}/metrics.csv")) if r.get("size/hidden")]
    sizes = [float(r["size/hidden"]) for r in rows]
    assert len(sizes) == 3 and sizes == sorted(sizes, reverse=True) and sizes[-1] == width
    assert all(float(r["train/penalty"]) > 0 for r in rows if r.get("train/penalty"))
    saved = torch.load(f"{folder}/checkpoints/last.ckpt", weights_only=True)
    assert saved["state_dict"]["net.hidden.linear.weight"].shape[0] <= 64

    # a fresh 64-unit net shrinks to the checkpoint's width before loading it, optimizer state included
    resumed = sparsifier_cli(
        "fit", root, "--trainer.max_epochs", "4", "--ckpt_path", f"{folder}/checkpoints/last.ckpt", "--name", "resumed"
    )
    assert resumed.current_epoch == 4
    assert resumed.lightning_module.net.hidden.linear.out_features <= width
    validated = sparsifier_cli("validate", root, "--ckpt_path", f"{folder}/checkpoints/last.ckpt")
    assert "val/acc" in validated.callback_metrics
