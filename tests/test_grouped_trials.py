"""A search probe's seeds trained together as one grouped net: each member as its own fit, divergence per member,
the settings it refuses, and the search's calls."""

import copy
import math
from functools import partial

import pytest
import pytorch_lightning as pl
import torch

from datamodules import Digits
from lightning_modules import Classifier, LearnedSize
from lightning_modules.nets import MLP, DepthCNN
from lightning_modules.nets.grouped_depth_cnn import GroupedDepthCNN
from lightning_modules.studies.depth_search import TrialLog, run_searches, search_plan
from lightning_modules.studies.grouped_trials import grouping_refusal, train_grouped
from lightning_modules.studies.search import error_rate
from lightning_modules.studies.trials import bare_trainer, quiet_lightning
from tests.conftest import CONFIGS, QUIET, cli_error

SEEDS = [0, 1]


def members_of(net: DepthCNN, depth: int, seeds: list[int]) -> list[DepthCNN]:
    """Each seed's net as a search trial draws it: seed_everything, then the net rebuilt at `depth`."""
    members = []
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        members.append(net.at_depth(depth))
    return members


def own_fit(template: Classifier, depth: int, seed: int, data, epochs: int, precision: str) -> tuple[Classifier, tuple]:
    """The fit a search trial runs for one seed (DepthTrial): the trained model and its (train, val) errors."""
    pl.seed_everything(seed, verbose=False)
    model = copy.deepcopy(template)
    model.net = template.net.at_depth(depth)
    with quiet_lightning():
        trainer = bare_trainer(epochs, precision=precision)
        trainer.fit(model, datamodule=data)
    return model, (
        error_rate(trainer, model, data.eval_dataloader("train")),
        trainer.callback_metrics["val/err"].item(),
    )


@pytest.mark.slow(12)
def test_each_grouped_member_trains_as_its_own_fit():
    """Batch norm, residual adds, weight decay by name pattern, momentum, a per-epoch scheduler and a first epoch of
    other batches, in float64: every member's weights and statistics are its own Lightning fit's to 1e-6 and its
    errors the same. (In float32 they agree to rounding, which batch norm over more channels sums in another order,
    and which some steps of SGD amplify: about 1e-3 of a weight's scale after 40 steps here.)"""
    data = Digits(batch_size=256, first_epoch_batch_size=128, val_size=700)
    data.setup("fit")
    net = DepthCNN(depth=6, activation="elu", batch_norm=True, residual=True)
    template = Classifier(
        net,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-3),
        scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        param_groups={"*.bias": {"weight_decay": 0.0}},
    )
    fit = train_grouped(template, members_of(net, 6, SEEDS), SEEDS, data, 2, None, torch.device("cpu"), "64-true")
    for s, seed in enumerate(SEEDS):
        model, errors = own_fit(template, 6, seed, data, 2, "64-true")
        own, member = model.net.state_dict(), fit.net.member(s).state_dict()
        torch.testing.assert_close(member, own, rtol=1e-6, atol=1e-6)  # names the tensor that differs
        assert fit.outcomes[s] == errors
    assert len(set(fit.outcomes)) == len(SEEDS)  # different nets


def test_a_diverged_member_is_diverged_alone():
    """A member whose loss turns non-finite gets NaN errors; the others train exactly as they do without it."""
    data = Digits(batch_size=64, val_size=200)
    data.setup("fit")
    net = DepthCNN(depth=3)
    template = Classifier(net, optimizer=partial(torch.optim.SGD, lr=0.05))
    good, bad = members_of(net, 3, [0, 1])
    with torch.no_grad():
        bad.head.weight.fill_(1e38)  # infinite logits: a NaN loss from the first step
    together = train_grouped(template, [copy.deepcopy(good), bad], [0, 1], data, 1, None, torch.device("cpu"))
    alone = train_grouped(template, [good], [0], data, 1, None, torch.device("cpu"))
    assert all(math.isnan(e) for e in together.outcomes[1])
    assert together.outcomes[0] == pytest.approx(alone.outcomes[0], abs=1 / 200) and not math.isnan(
        alone.outcomes[0][1]
    )


def test_a_member_whose_loss_explodes_past_the_guard_is_diverged():
    data = Digits(batch_size=64, val_size=200)
    data.setup("fit")
    net = DepthCNN(depth=3)
    template = Classifier(net, optimizer=partial(torch.optim.SGD, lr=0.05), max_loss=0.5)  # any loss is past 0.5
    fit = train_grouped(template, members_of(net, 3, [0]), [0], data, 1, None, torch.device("cpu"))
    assert all(math.isnan(e) for e in fit.outcomes[0])


def test_a_grouped_net_of_one_member_computes_as_the_member():
    net = DepthCNN(depth=6, activation="tanh", batch_norm=True)
    grouped = GroupedDepthCNN([net, net.at_depth(6)])
    x = torch.randn(4, 1, 28, 28)
    other = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(grouped(torch.cat([x, other], dim=1))[:, 0], net(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="same settings"):
        GroupedDepthCNN([net, net.at_depth(9)])


def depth_classifier(**kwargs) -> Classifier:
    return Classifier(DepthCNN(depth=3), **kwargs)


@pytest.mark.parametrize(
    "model, trainer, refusal",
    [
        (partial(depth_classifier, optimizer=partial(torch.optim.LBFGS, lr=0.1)), {}, "LBFGS does not update each"),
        (partial(depth_classifier, scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau), {}, "ReduceLROnPlateau"),
        (depth_classifier, {"precision": "bf16-mixed"}, "precision bf16-mixed"),
        (partial(LearnedSize, MLP(16)), {}, "the model is a LearnedSize"),
        (partial(Classifier, MLP(16)), {}, "not a DepthCNN"),
    ],
)
def test_what_the_grouped_loop_does_not_reproduce_is_named(model, trainer, refusal):
    model = model()
    assert refusal in grouping_refusal(model, [model.net], Digits(), pl.Trainer(logger=False, **trainer))
    plain = depth_classifier(optimizer=partial(torch.optim.Adam, lr=1e-3))
    assert grouping_refusal(plain, [plain.net], Digits(), pl.Trainer(logger=False)) is None


def test_a_search_sends_the_seeds_of_a_depth_as_one_grouped_call_and_shares_its_time():
    calls = []

    def train(variant, depth, seed):  # never called: every probe has several seeds
        raise AssertionError("trained alone")

    def group(variant, depth, seeds):
        calls.append((depth, seeds))
        return [(0.0, 0.05 if depth <= 6 else 0.9)] * len(seeds)

    log = TrialLog()
    plan = search_plan(12, seeds=2, confirm_seeds=3)
    [result] = run_searches({"net": plan}, train, log=log, group=group)
    assert result.deepest == 6 and result.confirmed
    # binary over m in 1..4: k = 6 trains, then 9 does not; the confirmation trains 6 and 9 with seeds 2-4
    assert calls == [(6, [0, 1]), (9, [0, 1]), (6, [2, 3, 4]), (9, [2, 3, 4])]
    shares = {}
    for t in log.trials.values():
        shares.setdefault((t.depth, t.phase), set()).add(t.seconds)
    assert all(len(s) == 1 for s in shares.values())  # a call's members share its time alike


def test_the_search_refuses_grouping_it_cannot_do_in_one_line(in_tmp, capsys):
    search = ["search", "--config", CONFIGS / "quickstart.yaml", "--upper", "3", "--seeds", "2", "--group_seeds", "true",
              "--trainer.precision", "bf16-mixed", *QUIET]  # fmt: skip
    assert cli_error(*search, capsys=capsys) == (
        "error: --group_seeds true: the seeds cannot train as one grouped net here (precision bf16-mixed: the grouped "
        "loop trains in float32 or float64)"
    )
    assert not (in_tmp / "runs").exists()
