"""Recycling dormant units (ReDo) on hand-built nets: recycling exactly dead units leaves the output as it was and
an event logs how far dormant but alive ones moved it, the recycled units' incoming weights are drawn again at the
init's scale, exactly their optimizer state is reset (Adam's step count kept: what that does to their first
steps), layers that cannot be recycled (or revived) are refused in one line, a resumed run recycles as an
uninterrupted one, events and observations share one step index, and DDP ranks end with equal nets."""

import math
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from callbacks import DeadUnits
from callbacks.activation_observer import logged_step
from lightning_modules import Classifier, ConfigError
from lightning_modules.layers.recycling import chain_units, normal_draw, recycle
from lightning_modules.nets import MLP, VGG, DepthCNN
from lightning_modules.recycling import Recycler, Recycling
from tests.conftest import TinyImages, ddp_from_forkserver, probe_images

SMALL_VGG = [["conv1", [8, None]], ["pool1", [2, 2]], ["conv2", [6, None]], ["fc3", [5, None]], ["logit", [None, None]]]


def nets() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Nets of each kind with recyclable units, and one input shape each."""
    torch.manual_seed(0)
    return {
        "mlp": (MLP(12, in_features=16), (5, 1, 4, 4)),
        "vgg": (VGG(SMALL_VGG, in_channels=1, input_size=8), (5, 1, 8, 8)),
        "vgg_bn": (VGG(SMALL_VGG, in_channels=1, input_size=8, batch_norm=True), (5, 1, 8, 8)),
        "depth": (DepthCNN(depth=6, activation="tanh", init_std=0.05), (5, 1, 28, 28)),
        "depth_bn": (DepthCNN(depth=6, activation="elu", batch_norm=True), (5, 1, 28, 28)),
        "resnet": (DepthCNN(depth=9, activation="elu", batch_norm=True, residual=True), (5, 1, 28, 28)),
    }


@torch.no_grad()
def silence(group, units: torch.Tensor) -> None:
    """Make `units` dead: zero incoming weights, bias 0 (-1 before a ReLU), batch norm bias 0: they output exactly 0."""
    group.incoming.weight[units] = 0
    group.incoming.bias[units] = -1.0 if isinstance(group.activation, nn.ReLU) else 0.0
    if group.norm is not None:
        group.norm.bias[units] = 0


@pytest.mark.parametrize("kind", list(nets()))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_recycling_dead_units_leaves_the_output_as_it_was(kind, mode):
    """Every other unit of every layer made dead, then recycled: the net computes what it computed before."""
    net, shape = nets()[kind]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    groups = net.recyclable_units()
    assert groups and all(not isinstance(g, str) for g in groups.values())
    chosen = {name: torch.arange(0, g.incoming.weight.shape[0], 2) for name, g in groups.items()}
    for name, group in groups.items():
        silence(group, chosen[name])
    net.train(mode == "train")
    before = net(x)
    for name, group in groups.items():
        recycle(group, chosen[name], torch.Generator().manual_seed(2))
    after = net(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    fresh = groups[next(iter(groups))].incoming.weight[chosen[next(iter(groups))]]
    assert (fresh != 0).all()  # the recycled units are alive again: fresh weights, not the zeros


def test_recycled_units_get_fresh_weights_at_the_inits_scale_and_zero_bias():
    torch.manual_seed(0)
    net = DepthCNN(depth=3, activation="tanh", init_std=0.05, widths=(64, 64, 64))
    group = net.recyclable_units()["features.2"]
    conv = group.incoming
    old = conv.weight.detach().clone()
    with torch.no_grad():
        conv.weight.mul_(10)  # trained far from the init
        conv.bias.fill_(3.0)
    units = torch.arange(0, 64, 2)
    recycle(group, units, torch.Generator().manual_seed(5))
    fresh = conv.weight[units].detach()
    assert fresh.std().item() == pytest.approx(0.05, rel=0.05) and not torch.equal(fresh, old[units])
    assert (conv.bias[units] == 0).all() and (conv.bias[1::2] == 3.0).all()
    assert torch.equal(conv.weight[1::2], 10 * old[1::2])  # the other units untouched
    he = VGG(SMALL_VGG, in_channels=1, input_size=8, init="fan_in").recyclable_units()["conv2"]
    drawn = he.draw(torch.Size((4000, 8, 3, 3)), torch.Generator().manual_seed(0))
    assert drawn.std().item() == pytest.approx((2 / (8 * 9)) ** 0.5, rel=0.02)  # He normal, fan-in 8 x 3 x 3


@pytest.mark.parametrize(
    "optimizer",
    [
        partial(torch.optim.Adam, lr=1e-2),
        partial(torch.optim.AdamW, lr=1e-2),
        partial(torch.optim.SGD, lr=0.1, momentum=0.9),
    ],
    ids=["adam", "adamw", "sgd_momentum"],
)
def test_exactly_the_changed_entries_lose_their_optimizer_state(optimizer):
    torch.manual_seed(0)
    net = VGG(SMALL_VGG, in_channels=1, input_size=8, batch_norm=True)
    opt = optimizer(net.parameters())
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6) % 10
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    before = {
        p: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in net.parameters()
    }
    group = net.recyclable_units()["conv2"]
    units = torch.tensor([1, 4])
    recycle(group, units, torch.Generator().manual_seed(3), opt)
    conv, norm, fc = group.incoming, group.norm, group.outgoing[0][0]
    block = group.outgoing[0][1]  # conv2's 6 channels after the flatten: 2 x 2 = 4 columns each
    columns = torch.cat([torch.arange(u * block, (u + 1) * block) for u in units])
    changed = {conv.weight: (units,), conv.bias: (units,), norm.weight: (units,), norm.bias: (units,),
               fc.weight: (slice(None), columns)}  # fmt: skip
    for p in net.parameters():
        for key, old in before[p].items():
            new = opt.state[p][key]
            if old.shape != p.shape:  # Adam's step count: not an entry's
                assert torch.equal(new, old), key
                continue
            mask = torch.zeros_like(p, dtype=torch.bool)
            if p in changed:
                mask[changed[p]] = True
            assert (new[mask] == 0).all(), key
            assert torch.equal(new[~mask], old[~mask]), key  # every other entry untouched
    assert (norm.weight[units] == 1).all() and (norm.running_var[units] == 1).all()


def test_layers_that_cannot_be_recycled_are_refused_in_one_line():
    no_bn = DepthCNN(depth=6, activation="elu", residual=True)
    with pytest.raises(
        ConfigError, match="recycling features.1: a residual block without batch norm adds its channels"
    ):
        Recycler(Recycling(names=("features.1",)), no_bn)
    with pytest.raises(ConfigError, match="recycling hidden: a flexible layer learns its own size"):
        Recycler(Recycling(), MLP(12, "flexible"))
    with pytest.raises(ConfigError, match="recycling: Identity has no recyclable units"):
        Recycler(Recycling(), nn.Identity())
    with pytest.raises(ConfigError, match=r"no layer of \['hidden'\] matches names \['conv\*'\]"):
        Recycler(Recycling(names=("conv*",)), MLP(12))


class Saved(pl.Callback):
    """Saves each rank's net and the recycling it logged at the end of training."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().cpu() for k, v in pl_module.net.state_dict().items()}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def fit_recycling(folder: Path, devices: int, strategy="auto") -> list[dict]:
    pl.seed_everything(4, verbose=False)
    model = Classifier(MLP(12, in_features=16), channels_last=False, recycle=Recycling(every_n_steps=2, tau=0.5))
    saving = ModelCheckpoint(dirpath=folder, filename="last")
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=6, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2, callbacks=[Saved(folder), saving],
    )  # fmt: skip
    trainer.fit(model, datamodule=TinyImages(probe_images(), batch_size=1))
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(devices)]


@pytest.mark.slow
@pytest.mark.subprocess
def test_ddp_ranks_recycle_alike_and_end_with_equal_nets(tmp_path):
    ranks = fit_recycling(tmp_path, devices=2, strategy=ddp_from_forkserver())
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # the checkpoint after step 6 keeps the scores since the event at 4: 2 batches of 1 sample on each of 2 ranks
    scores = torch.load(tmp_path / "last.ckpt", weights_only=True)["recycling"]["scores"]["hidden"]
    assert scores["samples"].sum().item() == 4 and scores["sums"].shape == (1, 12)


class Logged(pl.loggers.Logger):
    """Keeps what is logged, by step."""

    name, version = "logged", 0

    def __init__(self):
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics, step=None):
        self.rows.setdefault(step, {}).update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def dormant_but_alive(group, units: torch.Tensor, level: float) -> None:
    """Make `units` output the constant `level` (> 0: dormant but alive; 0: dead) on every input, and every other
    unit of the layer busy (bias 1)."""
    with torch.no_grad():
        group.incoming.bias.fill_(1.0)
        group.incoming.weight[units] = 0
        group.incoming.bias[units] = level if level > 0 else -1.0


@pytest.mark.parametrize("kind", ["mlp", "vgg"])
@pytest.mark.parametrize("level", [0.005, 0.0], ids=["dormant_alive", "dead"])
def test_an_event_logs_the_largest_logit_change_it_made(kind, level):
    """Units dormant but alive (0 < s_i <= tau) still feed their consumer: recycling them moves the logits, by
    exactly what the event logs; exactly dead units leave the logits as they were."""
    net, shape = nets()[kind]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    recycler = Recycler(Recycling(every_n_steps=1, tau=0.03), net)
    chosen = {name: torch.arange(0, g.incoming.weight.shape[0], 2) for name, g in recycler.groups.items()}
    for name, group in recycler.groups.items():
        dormant_but_alive(group, chosen[name], level)
    recycler.attach()
    net.train()
    net(x)  # the scoring batch
    before = net.eval()(x).detach()
    net.train()
    report = recycler.step(1, None, inputs=x)  # measures in eval mode, then gives the net back in train mode
    assert all(module.training for module in net.modules())
    after = net.eval()(x).detach()
    for name in chosen:
        assert torch.equal(recycler.events[-1]["units"][name], chosen[name]), name  # those units, and only those
    change = (after - before).abs().max().item()
    assert report["recycle/logit_change"] == pytest.approx(change, rel=1e-6, abs=1e-7)
    if level > 0:
        assert change > 1e-4
    else:
        assert change < 1e-5


def test_a_residual_relu_net_with_batch_norm_is_refused_in_one_line():
    """Silenced at its batch norm, a ReLU unit outputs relu(0) = 0, where its gradient is 0: it would never train."""
    net = DepthCNN(depth=6, activation="relu", batch_norm=True, residual=True)
    with pytest.raises(ConfigError, match=r"recycling features.0: .*relu\(0\) = 0.* never train again"):
        Recycler(Recycling(), net)


@pytest.mark.parametrize("activation", ["elu", "tanh"])
def test_a_recycled_residual_unit_trains_again(activation):
    torch.manual_seed(0)
    net = DepthCNN(depth=6, activation=activation, batch_norm=True, residual=True)
    group = net.recyclable_units()["features.1"]  # a residual block: silenced at its batch norm
    units = torch.tensor([0, 2])
    recycle(group, units, torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8)
    for step in range(2):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if step == 0:  # right after the event: the norm's affine of every recycled unit learns
            assert (group.norm.weight.grad[units] != 0).all() and (group.norm.bias.grad[units] != 0).all()
        else:  # one step later its fresh incoming weights do too
            assert (group.incoming.weight.grad[units].flatten(1).abs().sum(1) > 0).all()
        optimizer.step()


class Refusing(nn.Module):
    """A conv whose 3 channels a Linear of 10 inputs consumes: 10 is not a multiple of 3."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Linear(10, 2)

    def recyclable_units(self):
        return chain_units([("conv", self.conv), ("act", self.act), ("fc", self.fc)], lambda m: normal_draw(0.1))


def test_a_consumer_whose_inputs_are_not_whole_blocks_of_the_channels_is_refused():
    with pytest.raises(
        ConfigError, match=r"^recycling conv: fc takes 10 inputs, not a whole block per channel of conv"
    ):
        Recycler(Recycling(), Refusing())
    linears = [("a", nn.Linear(4, 6)), ("r", nn.ReLU()), ("b", nn.Linear(12, 2))]  # 12 = 2 x 6, yet one column each
    assert chain_units(linears, lambda m: None)["a"] == "b takes 12 inputs, not one per unit of a (6 units)"
    convs = [("a", nn.Conv2d(1, 4, 3)), ("r", nn.ReLU()), ("b", nn.Conv2d(4, 2, 3, groups=2))]
    assert (
        chain_units(convs, lambda m: None)["a"] == "b takes 4 input channels in 2 groups, not one per channel of a (4)"
    )


class Seen(pl.Callback):
    """Per observation (a training forward, a validation), the step index it is logged at and the events made."""

    def __init__(self):
        self.seen: list[tuple[str, int, int]] = []

    def on_after_backward(self, trainer, pl_module) -> None:
        self.seen.append(("train", logged_step(trainer), len(pl_module.recycler.events)))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.seen.append(("val", logged_step(trainer), len(pl_module.recycler.events)))


def fit_mlp(max_steps: int, ckpt_path=None, callbacks=(), validate: bool = False) -> tuple[pl.Trainer, Logged]:
    """The MLP on one image per epoch (every step ends an epoch), an event every 2 steps, tau 0.5."""
    pl.seed_everything(4, verbose=False)
    model = Classifier(MLP(12, in_features=16), channels_last=False, recycle=Recycling(every_n_steps=2, tau=0.5))
    logged = Logged()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=logged,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=2 if validate else 0, callbacks=list(callbacks),
    )  # fmt: skip
    trainer.fit(model, datamodule=TinyImages(probe_images(), batch_size=1), ckpt_path=ckpt_path)
    return trainer, logged


def test_a_run_resumed_at_a_recycling_step_recycles_as_the_uninterrupted_one(tmp_path):
    """The checkpoint at step 2 is written at an event's step: the resumed run still makes that event, from the
    scores gathered before it (kept in the checkpoint), and ends with the uninterrupted run's weights."""
    saving = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    whole, _ = fit_mlp(5, callbacks=[saving])
    resumed, logged = fit_mlp(
        5, ckpt_path=tmp_path / "step=2.ckpt", callbacks=[ModelCheckpoint(dirpath=tmp_path / "r")]
    )
    events = [whole.lightning_module.recycler.events, resumed.lightning_module.recycler.events]
    assert [e["step"] for e in events[0]] == [e["step"] for e in events[1]] == [2, 4]
    assert all(len(e["units"]["hidden"]) > 0 for e in events[0])  # tau 0.5: some units recycled each time
    for a, b in zip(*events, strict=True):
        assert torch.equal(a["units"]["hidden"], b["units"]["hidden"])
    state = resumed.lightning_module.net.state_dict()
    for key, value in whole.lightning_module.net.state_dict().items():
        assert torch.equal(state[key], value), key
    assert "recycle/hidden/dormant_again" in logged.rows[4]  # against the event made after the resume, at step 2


def test_events_and_observations_share_one_step_index(tmp_path):
    """An event at step s comes before the step Lightning logs at s: what is logged below s saw the net before it
    (the validation after the s-th step is logged at s - 1), what is logged at s or later saw it after; the
    event's keys go to the row of step s."""
    seen = Seen()
    trainer, logged = fit_mlp(5, callbacks=[seen], validate=True)
    steps = [e["step"] for e in trainer.lightning_module.recycler.events]
    assert steps == [2, 4]
    assert [s for s, row in logged.rows.items() if "recycle/hidden/recycled" in row] == steps
    assert {kind for kind, _, _ in seen.seen} == {"train", "val"}
    for kind, step, made in seen.seen:
        assert made == sum(s <= step for s in steps), (kind, step)


def test_each_check_counts_the_units_recycled_within_the_last_period_apart():
    """A recycled unit starts with zero outgoing weights: alive by its fresh activations before it feeds anything.
    Each validation during fit logs how many units were recycled fewer than F steps before it (`fresh`)."""
    trainer, logged = fit_mlp(5, validate=True)
    events = {e["step"]: len(e["units"]["hidden"]) for e in trainer.lightning_module.recycler.events}
    # the validation after g steps is logged at g - 1; the event at 2 comes after the one at g = 2
    expected = {0: 0, 1: 0, 2: events[2], 3: 0, 4: events[4]}
    assert {s: row["recycle/hidden/fresh"] for s, row in logged.rows.items() if "recycle/hidden/fresh" in row} == (
        expected
    )


@pytest.mark.parametrize("prior", [100, 1000])
def test_the_fresh_entries_adam_steps_against_a_freshly_started_adams(prior):
    """Kept as the official implementation does: the recycled entries' moments are zeroed and Adam's step count
    (one per tensor) kept, so their bias correction is the tensor's step t, not their own k: their k-th update is
    [(1 - b1^k) / (1 - b1^t)] sqrt((1 - b2^t) / (1 - b2^k)) times a freshly started Adam's on the same gradients
    (t = prior + k; the factors in docs/training-dynamics.md)."""
    torch.manual_seed(0)
    net = MLP(12, in_features=16)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = torch.randn(64, 1, 4, 4), torch.arange(64) % 10
    for _ in range(prior):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    group, units = net.recyclable_units()["hidden"], torch.tensor([0, 3, 5])
    recycle(group, units, torch.Generator().manual_seed(1), optimizer)

    def entries() -> torch.Tensor:  # every entry recycling changed
        return torch.cat([group.incoming.weight[units].flatten(), group.outgoing[0][0].weight[:, units].flatten()])

    fresh = nn.Parameter(entries().detach().clone())  # the same entries under an Adam that starts now
    started = torch.optim.Adam([fresh], lr=1e-3)
    b1, b2 = 0.9, 0.999
    for k in range(1, 101):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        before, grad = (
            entries().detach().clone(),
            torch.cat(
                [group.incoming.weight.grad[units].flatten(), group.outgoing[0][0].weight.grad[:, units].flatten()]
            ),
        )
        optimizer.step()
        fresh.grad, fresh_before = grad, fresh.detach().clone()
        started.step()
        if k in (1, 10, 100):
            t = prior + k
            factor = (1 - b1**k) / (1 - b1**t) * math.sqrt((1 - b2**t) / (1 - b2**k))
            moved, moved_fresh = (entries() - before).abs().sum(), (fresh - fresh_before).abs().sum()
            assert (moved / moved_fresh).item() == pytest.approx(factor, rel=1e-3), k
    assert optimizer.state[group.incoming.weight]["step"].item() == prior + 100  # the count was kept


def test_the_dormant_share_record_uses_the_dashboards_step_index(tmp_path, monkeypatch):
    """unit_health.pt's steps (the x-axis of dormant_share.png) are the steps the same checks' keys are logged at."""
    monkeypatch.chdir(tmp_path)
    watch = DeadUnits(print_table=False)
    _, logged = fit_mlp(5, callbacks=[watch], validate=True)
    logged_at = sorted(s for s, row in logged.rows.items() if "val/acc" in row)  # the same checks
    assert watch.health["hidden"]["steps"] == logged_at == [0, 1, 2, 3, 4]
