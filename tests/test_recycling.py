"""Recycling dormant units (ReDo) on hand-built nets: the output is unchanged at the instant, the recycled units'
incoming weights are drawn again at the init's scale, exactly their optimizer state is reset, layers that cannot
be recycled are refused in one line, and DDP ranks end with equal nets."""

from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules import Classifier, ConfigError
from lightning_modules.layers.recycling import recycle
from lightning_modules.nets import MLP, VGG, DepthCNN
from lightning_modules.recycling import Recycler, Recycling
from tests.conftest import TinyImages, probe_images

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
def test_the_output_is_unchanged_at_the_instant_of_recycling(kind, mode):
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


def fit_recycling(folder: Path, devices: int, strategy: str = "auto") -> list[dict]:
    pl.seed_everything(4, verbose=False)
    model = Classifier(MLP(12, in_features=16), channels_last=False, recycle=Recycling(every_n_steps=2, tau=0.5))
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=6, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Saved(folder)],
    )  # fmt: skip
    trainer.fit(model, datamodule=TinyImages(probe_images(), batch_size=1))
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(devices)]


@pytest.mark.slow
@pytest.mark.subprocess
def test_ddp_ranks_recycle_alike_and_end_with_equal_nets(tmp_path):
    ranks = fit_recycling(tmp_path, devices=2, strategy="ddp_spawn")
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key


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


def test_a_checkpoint_keeps_the_events_and_a_resumed_run_reports_against_them(tmp_path):
    def fit(max_steps: int, ckpt_path=None) -> tuple[pl.Trainer, Logged]:
        pl.seed_everything(4, verbose=False)
        model = Classifier(MLP(12, in_features=16), channels_last=False, recycle=Recycling(every_n_steps=2, tau=0.5))
        logged = Logged()
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=max_steps, logger=logged, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(model, datamodule=TinyImages(probe_images(), batch_size=1), ckpt_path=ckpt_path)
        return trainer, logged

    first, _ = fit(4)
    first.save_checkpoint(tmp_path / "four.ckpt")
    saved = torch.load(tmp_path / "four.ckpt", weights_only=True)["recycling"]
    assert [e["step"] for e in saved["events"]] == [2, 4] and saved["last_event"] == 4
    assert all(len(e["units"]["hidden"]) > 0 for e in saved["events"])  # tau 0.5: some units recycled each time

    resumed, logged = fit(8, ckpt_path=tmp_path / "four.ckpt")
    events = resumed.lightning_module.recycler.events
    assert [e["step"] for e in events] == [2, 4, 6, 8]
    assert [e["units"]["hidden"].tolist() for e in events[:2]] == [
        e["units"]["hidden"].tolist() for e in saved["events"]
    ]
    # the first event after the resume reports how many of step 4's units are dormant again
    assert "recycle/hidden/dormant_again" in logged.rows[6] and "recycle/hidden/recycled" in logged.rows[6]
