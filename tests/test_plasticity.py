"""Weight interventions against loss of plasticity (lightning_modules/plasticity.py), from spec 07's formulas on
hand-built nets: L2 Init's gradient, shrink and perturb's closed form, a head reset that re-draws the head alone."""

import copy
import csv
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from datamodules import Digits
from datamodules.task_stream import TaskStream
from lightning_modules import Classifier
from lightning_modules.continual_backprop import ContinualBackprop
from lightning_modules.errors import ConfigError
from lightning_modules.layers.recycling import uniform_draw
from lightning_modules.nets import MLP, DepthCNN
from lightning_modules.plasticity import Interventions, Plasticity, draw_seed, reinitialise
from tests.conftest import CONFIGS, QUIET, cli, cli_error, two_ranks

PERMUTED = CONFIGS / "plasticity" / "permuted_digits.yaml"
SHORT = ["--data.init_args.tasks", "3", "--data.init_args.steps_per_task", "5", "--trainer.max_steps", "15",
         "--trainer.val_check_interval", "5", "--trainer.callbacks", "[]", *QUIET]  # fmt: skip


def test_l2_init_adds_lambda_times_the_squared_distance_to_the_initial_weights_and_its_gradient():
    torch.manual_seed(0)
    model = Classifier(MLP(width=8), plasticity=Plasticity(l2_init=0.1))
    start = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(torch.randn_like(p))
    penalty = model.interventions.penalty(model.net, model.initial_weights)
    distance = sum(((p - start[n]) ** 2).sum() for n, p in model.net.named_parameters())
    torch.testing.assert_close(penalty, 0.1 * distance)
    grads = torch.autograd.grad(penalty, list(model.net.parameters()))
    for (name, param), grad in zip(model.net.named_parameters(), grads, strict=True):
        torch.testing.assert_close(grad, 2 * 0.1 * (param - start[name]))
    assert "initial_weights.hidden__linear__weight" in model.state_dict()  # theta_0 goes into checkpoints


def test_shrink_and_perturb_is_lambda_theta_plus_p_times_a_fresh_draw_of_the_nets_own_init():
    torch.manual_seed(0)
    settings = Plasticity(shrink=0.8, perturb=0.01, seed=3)
    net = DepthCNN(depth=6, activation="elu", init_std=0.3)  # an init of its own, not PyTorch's default
    before = copy.deepcopy(net)
    done = Interventions(settings, net).before_step(net, torch.optim.SGD(net.parameters(), lr=0.1), 10, True)
    assert done == {"plasticity/shrink_perturb": 1.0}
    torch.manual_seed(draw_seed(settings, 10, 0))  # the fresh draw, made here again: the net's own init
    fresh = DepthCNN(depth=6, activation="elu", init_std=0.3)
    for (name, new), old, drawn in zip(net.named_parameters(), before.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(new, 0.8 * old + 0.01 * drawn, msg=name)
    conv = fresh.features[0].conv.weight
    assert abs(conv.std().item() - 0.3) < 0.1  # N(0, 0.3^2), the net's init, not PyTorch's default
    untouched = copy.deepcopy(net)
    Interventions(settings, net).before_step(net, torch.optim.SGD(net.parameters(), lr=0.1), 11, False)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), untouched.parameters(), strict=True))


def test_a_head_reset_redraws_the_head_alone_and_clears_its_optimizer_state():
    torch.manual_seed(0)
    net = MLP(width=8)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 1, 28, 28)).sum().backward()
    optimizer.step()
    before = copy.deepcopy(net)
    settings = Plasticity(head_reset=True, seed=1)
    Interventions(settings, net).before_step(net, optimizer, 20, task_boundary=True)
    fresh = nn.Linear(8, 10)
    reinitialise(fresh, draw_seed(settings, 20, 1))
    assert torch.equal(net.out.weight, fresh.weight) and torch.equal(net.out.bias, fresh.bias)
    assert not torch.equal(net.out.weight, before.out.weight)
    assert all(torch.equal(a, b) for a, b in zip(net.hidden.parameters(), before.hidden.parameters(), strict=True))
    assert net.out.weight not in optimizer.state and net.hidden.linear.weight in optimizer.state


def test_interventions_at_task_boundaries_on_data_that_is_no_stream_are_refused_in_one_line(in_tmp, capsys):
    error = cli_error("fit", "--config", CONFIGS / "quickstart.yaml", "--model.init_args.plasticity.head_reset",
                      "true", "--trainer.max_steps", "2", *QUIET, capsys=capsys)  # fmt: skip
    assert "head_reset and shrink and perturb at task boundaries need a task stream" in error


def test_a_stream_fit_with_every_intervention_acts_at_its_task_boundaries(in_tmp):
    args = ["--model.init_args.plasticity.l2_init", "0.001", "--model.init_args.plasticity.shrink", "0.9",
            "--model.init_args.plasticity.perturb", "0.01", "--model.init_args.plasticity.head_reset", "true",
            "--model.init_args.plasticity.cbp", "true", "--model.init_args.plasticity.cbp_rate", "0.01",
            "--model.init_args.plasticity.cbp_maturity", "2"]  # fmt: skip
    trainer = cli("fit", "--config", PERMUTED, *SHORT, *args).trainer
    assert trainer.global_step == 15
    rows = (in_tmp / "runs" / "plasticity" / "permuted_digits" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [
        r.split(",")[header.index("step")] for r in rows[1:] if r.split(",")[header.index("plasticity/head_reset")]
    ]
    assert steps == ["5", "10"]  # the boundaries before tasks 1 and 2
    replaced = [float(r.split(",")[header.index("cbp/hidden/replaced")] or 0) for r in rows[1:]]
    # 2.56 units owed a step, whole ones replaced once mature (older than 2 steps: from the third of 14 events on)
    assert sum(replaced) == 30
    saved = torch.load(next((in_tmp / "runs").rglob("last.ckpt")), weights_only=True)
    assert (
        saved["plasticity"]["cbp"]["age"]["hidden"].shape == (256,)
        and "initial_weights.out__bias" in saved["state_dict"]
    )


EVERY_INTERVENTION = ["--model.init_args.plasticity.l2_init", "0.001", "--model.init_args.plasticity.shrink", "0.9",
                      "--model.init_args.plasticity.perturb", "0.01", "--model.init_args.plasticity.head_reset", "true",
                      "--model.init_args.plasticity.cbp", "true", "--model.init_args.plasticity.cbp_rate", "0.01",
                      "--model.init_args.plasticity.cbp_maturity", "2"]  # fmt: skip


def metric_rows(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "metrics.csv").open()))


@pytest.mark.slow
def test_a_stream_crashed_mid_task_resumes_in_place_as_if_never_stopped(tmp_path, monkeypatch):
    """4 tasks of 10 steps with every intervention and the stream's callbacks; a crash before step 25 (in task 2,
    after the checkpoint of task 1's end), then `--ckpt_path last`: the same weights, theta_0, CBP state, optimizer
    state and metrics.csv rows as the run never stopped (the loader's position, TaskAccuracy's counts and the draws
    from (seed, step) included)."""
    args = ["fit", "--config", PERMUTED, "--data.init_args.tasks", "4", "--data.init_args.steps_per_task", "10",
            "--trainer.max_steps", "40", "--trainer.val_check_interval", "10", *QUIET, *EVERY_INTERVENTION]  # fmt: skip
    runs = {}
    for name in ("whole", "crashed"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        runs[name] = tmp_path / name / "runs" / "plasticity" / "permuted_digits" / "version_0"
        if name == "whole":
            cli(*args)
            continue
        with pytest.raises(RuntimeError, match="crashed before step 25"):
            cli(*args, "--trainer.callbacks+=tests.killer.CrashAtStep")
        assert any(int(r["step"]) > 20 for r in metric_rows(runs[name]))  # rows of the steps lost were written
        assert torch.load(runs[name] / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20
        assert cli(*args, "--ckpt_path", "last").trainer.global_step == 40
    whole, resumed = (torch.load(runs[n] / "checkpoints" / "last.ckpt", weights_only=True) for n in runs)
    for key, value in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(resumed["plasticity"], whole["plasticity"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["optimizer_states"][0]["state"], whole["optimizer_states"][0]["state"])
    rows_whole, rows_resumed = metric_rows(runs["whole"]), metric_rows(runs["crashed"])
    assert [r["step"] for r in rows_resumed] == [r["step"] for r in rows_whole]  # no row twice, none missing
    for got, want in zip(rows_resumed, rows_whole, strict=True):
        for key, value in want.items():
            assert (float(got[key]) if got[key] else None) == pytest.approx(float(value) if value else None), key
    events = [r["step"] for r in rows_resumed if r["plasticity/head_reset"]]
    assert events == ["10", "20", "30"]


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="shrink_perturb_every must be 'task' or 'step'"):
        Interventions(Plasticity(shrink_perturb_every="epoch"), MLP(width=4))
    with pytest.raises(ConfigError, match="head_reset needs a net whose last layer is a Linear"):
        Interventions(Plasticity(head_reset=True), nn.Sequential(nn.Conv2d(1, 1, 1)))


def intervened_rank(rank: int, folder: str) -> None:
    """One of 2 DDP ranks training 15 steps of a 3-task stream with every intervention, saving its net."""
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    stream = TaskStream(Digits(batch_size=32), "permuted_inputs", tasks=3, steps_per_task=5)
    settings = Plasticity(l2_init=0.01, shrink=0.9, perturb=0.05, shrink_perturb_every="step", head_reset=True,
                          cbp=True, cbp_rate=0.02, cbp_maturity=2)  # fmt: skip
    model = Classifier(MLP(width=16), optimizer=partial(torch.optim.Adam, lr=0.01), plasticity=settings)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=15, val_check_interval=5, check_val_every_n_epoch=None,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=stream)
    torch.save(model.net.state_dict(), Path(folder) / f"rank{rank}.pt")


@pytest.mark.subprocess
def test_two_ranks_draw_the_same_fresh_weights_and_keep_one_net(tmp_path):
    """Each rank draws its own dropout and augmentation (seed_this_rank), so fresh weights from a rank's own stream
    would part the nets; drawn from (seed, step) they stay one net, bit for bit."""
    two_ranks(intervened_rank, str(tmp_path))
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    pl.seed_everything(0, verbose=False)
    assert not torch.equal(first["out.weight"], MLP(width=16).out.weight)  # trained, shrunk, perturbed and reset


def known_mlp() -> MLP:
    """4 hidden ReLU units that all output 1 (zero weights, bias 1), unit i feeding the head with |w| = i + 1 each,
    but unit 2 with 0.1: the least useful."""
    net = MLP(width=4)
    with torch.no_grad():
        net.hidden.linear.weight.zero_()
        net.hidden.linear.bias.fill_(1.0)
        for unit, magnitude in enumerate([1.0, 2.0, 0.1, 4.0]):
            net.out.weight[:, unit] = magnitude * torch.where(torch.arange(10) % 2 == 0, 1.0, -1.0)
    return net


def test_cbp_utility_is_the_decayed_mean_activation_times_the_outgoing_magnitudes():
    net = known_mlp()
    cbp = ContinualBackprop(net, rate=1e-4, decay=0.9)
    cbp.attach()
    net.train()(torch.randn(8, 1, 28, 28))
    torch.testing.assert_close(cbp.utility["hidden"], 0.1 * 1.0 * 10 * torch.tensor([1.0, 2.0, 0.1, 4.0]))
    net(torch.randn(8, 1, 28, 28))
    torch.testing.assert_close(cbp.utility["hidden"], (0.9 * 0.1 + 0.1) * 10 * torch.tensor([1.0, 2.0, 0.1, 4.0]))
    net.eval()(torch.randn(8, 1, 28, 28))  # evaluation batches leave it
    torch.testing.assert_close(cbp.utility["hidden"], 0.19 * 10 * torch.tensor([1.0, 2.0, 0.1, 4.0]))


def test_cbp_replaces_the_least_useful_mature_unit_as_redo_does_and_resets_its_utility_and_age():
    torch.manual_seed(0)
    net = known_mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    cbp = ContinualBackprop(net, rate=0.25, maturity=0, seed=2)  # 4 units x 0.25: one a step
    cbp.attach()
    net.train()(torch.randn(8, 1, 28, 28))
    assert cbp.step(1, optimizer) == {"cbp/hidden/replaced": 1.0}
    fresh = uniform_draw(1 / 28)(torch.Size((1, 784)), torch.Generator().manual_seed((2 << 40) + (1 << 8)))
    torch.testing.assert_close(net.hidden.linear.weight[2], fresh[0])
    assert net.hidden.linear.bias[2] == 0 and not net.out.weight[:, 2].any()
    assert not optimizer.state[net.out.weight]["momentum_buffer"][:, 2].any()
    assert cbp.utility["hidden"][2] == 0 and cbp.age["hidden"].tolist() == [1, 1, 0, 1]
    assert net.hidden.linear.weight[[0, 1, 3]].abs().sum() == 0  # the others untouched


def test_cbp_replaces_rho_n_units_a_step_as_a_carried_fraction_and_only_mature_ones():
    net = known_mlp()
    cbp = ContinualBackprop(net, rate=0.125, maturity=3)  # 0.5 units a step: one every second step
    cbp.attach()
    replaced = []
    for step in range(1, 11):
        net.train()(torch.randn(4, 1, 28, 28))
        replaced.append(cbp.step(step, None).get("cbp/hidden/replaced", 0.0))
    # owed at steps 2, 4, 6, 8 and 10; at step 2 every unit is 2 steps old, not older than 3: none is replaced
    assert replaced == [0, 0, 0, 1, 0, 1, 0, 1, 0, 1]
    # unit 2 (the least useful) at 4, then unit 0 at 6; with no training a fresh unit keeps zero outgoing weights,
    # so utility 0, and goes again once mature: unit 2 at 8, unit 0 at 10; units 1 and 3 never
    assert cbp.age["hidden"].tolist() == [0, 10, 2, 10]


def test_cbp_refuses_a_net_it_cannot_weigh():
    with pytest.raises(ConfigError, match="continual backprop hidden: a flexible layer learns its own size"):
        ContinualBackprop(MLP(width=4, layer="flexible"))
    with pytest.raises(ConfigError, match="has no recyclable units"):
        ContinualBackprop(nn.Sequential(nn.Linear(2, 2)))
