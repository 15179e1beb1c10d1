"""SeedStack: seeds trained together (vmapped) end where the same seeds trained one by one with Lightning end."""

import pytest
import pytorch_lightning as pl
import torch

from datamodules import MNIST
from lightning_modules import LearnedSize
from lightning_modules.nets import MLP
from lightning_modules.studies.seed_stack import SeedStack
from lightning_modules.studies.trials import bare_trainer
from tests.conftest import make_mnist


def adam(params):
    return torch.optim.Adam(params, lr=0.01)


def datamodule(root) -> MNIST:
    return MNIST(data_dir=str(root), download=False, val_size=24, batch_size=16)


def lightning_fit(root, net_args: dict, seed: int, epochs: int, penalty: float) -> LearnedSize:
    """One seed as `train.py fit --seed_everything seed` trains it."""
    pl.seed_everything(seed, verbose=False)
    model = LearnedSize(MLP(**net_args), optimizer=adam, penalty=penalty, prune_every_n_epochs=None)
    trainer = bare_trainer(epochs)
    trainer.fit(model, datamodule=datamodule(root))
    model.val_acc = trainer.callback_metrics["val/acc"].item()
    return model


@pytest.mark.parametrize(
    "net_args, penalty",
    [
        ({"width": 24, "layer": "static"}, 0.0),
        ({"width": 24, "layer": "flexible", "start_size": 12.0}, 0.05),
        ({"width": 24, "layer": "sparsifier"}, 0.05),
    ],
    ids=["static", "flexible", "sparsifier"],
)
def test_stacked_seeds_equal_seeds_trained_one_by_one(tmp_path, net_args, penalty):
    root = make_mnist(tmp_path, n_train=120)
    seeds, epochs = [3, 7], 2
    data = datamodule(root)
    data.setup("fit")
    stack = SeedStack.build([lambda: MLP(**net_args)], seeds)
    records = stack.fit(data, epochs, lambda named: adam([p for _, p in named]), penalty=penalty)
    for i, seed in enumerate(seeds):
        alone = lightning_fit(root, net_args, seed, epochs, penalty)
        for name, param in alone.net.state_dict().items():
            torch.testing.assert_close(stack.net(i).state_dict()[name], param, rtol=1e-4, atol=1e-5)
        assert records[-1].val_acc[i] == pytest.approx(alone.val_acc, abs=1e-6)
        assert records[-1].sizes["hidden"][i] == pytest.approx(alone.net.sizes()["hidden"].item(), abs=1e-3)
    # the seeds really differ: own initialisation and data order
    assert not torch.equal(stack.net(0).out.weight, stack.net(1).out.weight)


def test_members_may_differ_in_start_size_and_penalty(tmp_path):
    root = make_mnist(tmp_path, n_train=120)
    data = datamodule(root)
    data.setup("fit")
    makers = [lambda s=s: MLP(24, "flexible", start_size=s) for s in (4.0, 20.0)]
    stack = SeedStack.build(makers, [0])
    assert stack.sizes()["hidden"].tolist() == [4.0, 20.0]
    stack.fit(data, 1, lambda named: adam([p for _, p in named]), penalty=[0.0, 0.5])
    alone = lightning_fit(root, {"width": 24, "layer": "flexible", "start_size": 20.0}, 0, 1, 0.5)
    torch.testing.assert_close(stack.net(1).hidden.x0, alone.net.hidden.x0, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="same parameter names and shapes"):
        SeedStack([MLP(8), MLP(16)], [0, 0])


def test_hidden_statistics_match_a_direct_pass(tmp_path):
    root = make_mnist(tmp_path, n_train=120)
    data = datamodule(root)
    data.setup("fit")
    stack = SeedStack.build([lambda: MLP(24)], [0, 1])
    stats = stack.hidden_statistics(data.eval_dataloader("val"), pca_samples=10)
    x = torch.cat([b[0] for b in data.eval_dataloader("val")])
    for i in range(2):
        pre, post = stack.net(i).hidden_activations(x)
        torch.testing.assert_close(stats.peaks[i], post.amax(0))
        torch.testing.assert_close(stats.moments[i].var.float(), post.var(0, unbiased=False), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats.pre_rows[i], pre[:10])


def test_a_diverged_member_does_not_disturb_the_others(tmp_path):
    root = make_mnist(tmp_path, n_train=120)
    data = datamodule(root)
    data.setup("fit")
    stack = SeedStack.build([lambda: MLP(24)], [0, 0])
    with torch.no_grad():
        stack.params["net.out.bias"][1] = float("nan")  # member 1 diverges from the first step
    # the reference: the same stack with both members healthy (the same shapes, so the same kernels and the
    # same rounding whatever the thread count; a stack of one sums in another order on several threads)
    alone = SeedStack.build([lambda: MLP(24)], [0, 0])
    adam_named = lambda named: adam([p for _, p in named])  # noqa: E731
    record = stack.fit(data, 1, adam_named)[-1]
    alone.fit(data, 1, adam_named)
    assert record.train_loss[1] != record.train_loss[1] and record.train_loss[0] == record.train_loss[0]  # NaN
    for name, param in alone.net(0).state_dict().items():
        torch.testing.assert_close(stack.net(0).state_dict()[name], param)


class DropoutNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.drop = torch.nn.Linear(4, 32), torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.linear(x))


def test_members_draw_their_own_dropout_masks_and_random_slopes():
    """Members built from the same seed (equal weights): in training only their own draws can tell them apart."""
    x = torch.ones(16, 4)
    dropped = SeedStack.build([DropoutNet], [0, 0]).call("forward", x, training=True) == 0  # (members, batch, units)
    assert not torch.equal(dropped[0], dropped[1])
    assert 0.3 < dropped.float().mean() < 0.7
    flexible = SeedStack.build([lambda: MLP(24, "flexible", start_size=12.0, random_slope=True)], [0, 0])
    out = flexible.call("forward", torch.rand(16, 784), training=True)
    assert not torch.allclose(out[0], out[1])  # one slope per member and batch, not one for the stack
    evaluated = flexible.call("forward", torch.rand(16, 784))  # evaluation: the fixed slope, no draws
    assert torch.equal(evaluated[0], evaluated[1])


def test_members_with_the_same_seed_train_apart_when_training_draws_at_random(tmp_path):
    data = datamodule(make_mnist(tmp_path, n_train=120))
    data.setup("fit")
    stack = SeedStack.build([lambda: MLP(24, "flexible", start_size=12.0, random_slope=True)], [0, 0])
    stack.fit(data, 1, lambda named: adam([p for _, p in named]), penalty=0.05)
    assert not torch.equal(stack.net(0).hidden.linear.weight, stack.net(1).hidden.linear.weight)


def test_a_stack_refuses_a_first_epoch_batch_size_it_would_ignore(tmp_path):
    data = MNIST(data_dir=str(make_mnist(tmp_path)), val_size=24, batch_size=16, first_epoch_batch_size=4)
    data.setup("fit")
    with pytest.raises(ValueError, match="first_epoch_batch_size is not honoured"):
        SeedStack.build([lambda: MLP(8)], [0]).fit(data, 1, lambda named: adam([p for _, p in named]))
