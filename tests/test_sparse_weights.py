"""SparseWeights: exact non-zeros per unit, a seeded mask, init at the kept fan-in, zeros after every step."""

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from datamodules import Digits
from lightning_modules import Classifier
from lightning_modules.layers import SparseWeights
from lightning_modules.nets import SparseCNN


def masked_are_zero(sparse: SparseWeights) -> bool:
    weight = sparse.module.weight
    return bool((weight[~sparse.weight_mask] == 0).all()) and bool((weight[sparse.weight_mask] != 0).all())


@pytest.mark.parametrize(
    "module, sparsity, keep",
    [(nn.Linear(20, 6), 0.7, 6), (nn.Linear(1600, 8), 0.6, 640), (nn.Conv2d(3, 4, 3), 0.5, 14)],  # round(13.5) = 14
)
def test_each_unit_keeps_exactly_round_of_its_fan_in(module, sparsity, keep):
    sparse = SparseWeights(module, sparsity, seed=1)
    per_unit = sparse.weight_mask.flatten(1).sum(dim=1)
    assert per_unit.tolist() == [keep] * module.weight.shape[0]
    assert masked_are_zero(sparse) and sparse.keep == keep
    assert module.bias is not None and (module.bias != 0).all()  # the bias is never masked


def test_mask_comes_from_a_seeded_generator():
    a, b = SparseWeights(nn.Linear(50, 10), 0.8, seed=3), SparseWeights(nn.Linear(50, 10), 0.8, seed=3)
    assert torch.equal(a.weight_mask, b.weight_mask)
    assert not torch.equal(a.weight_mask, SparseWeights(nn.Linear(50, 10), 0.8, seed=4).weight_mask)
    torch.manual_seed(0)
    c = SparseWeights(nn.Linear(50, 10), 0.8)
    torch.manual_seed(0)
    d = SparseWeights(nn.Linear(50, 10), 0.8)
    assert torch.equal(c.weight_mask, d.weight_mask)  # seed_everything fixes the default mask
    assert "weight_mask" in c.state_dict()


def test_init_is_scaled_to_the_kept_fan_in():
    torch.manual_seed(0)
    sparse = SparseWeights(nn.Linear(1000, 200), 0.9)  # 100 kept of 1000: bound 1/sqrt(1000) -> 1/sqrt(100)
    kept = sparse.module.weight[sparse.weight_mask]
    assert 0.095 < kept.abs().max().item() <= 0.1 + 1e-6
    assert kept.std().item() == pytest.approx(0.1 / 3**0.5, rel=0.05)  # uniform(-b, b) has std b / sqrt(3)


def test_invalid_sparsity_is_refused():
    with pytest.raises(ValueError, match="sparsity"):
        SparseWeights(nn.Linear(4, 2), 1.0)
    with pytest.raises(TypeError, match="Linear or Conv2d"):
        SparseWeights(nn.Conv1d(2, 2, 3), 0.5)


def sparse_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(SparseWeights(nn.Linear(16, 12), 0.75), nn.ReLU(), SparseWeights(nn.Conv2d(1, 1, 1), 0.0))


def train_steps(model: Classifier, optimizer: torch.optim.Optimizer, steps: int) -> None:
    x, y = torch.randn(32, 16), torch.randint(0, 12, (32,))
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model.net[:2](x), y).backward()
        optimizer.step()


@pytest.mark.parametrize(
    "factory",
    [
        partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.01),
        partial(torch.optim.Adam, lr=0.01),
        partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd-momentum-wd", "adam", "adamw"],
)
def test_masked_weights_are_exactly_zero_after_every_optimizer_step(factory):
    model = Classifier(sparse_net(), optimizer=factory, channels_last=False)
    optimizer = model.configure_optimizers()
    sparse = model.net[0]
    before = sparse.module.weight.detach().clone()
    train_steps(model, optimizer, 50)
    assert masked_are_zero(sparse) and not torch.equal(before, sparse.module.weight)
    # without the framework's hook the same optimizer moves them: the hook is what keeps them at zero
    plain = Classifier(sparse_net(), channels_last=False)
    train_steps(plain, factory(plain.net.parameters()), 1)
    assert (plain.net[0].module.weight[~plain.net[0].weight_mask] != 0).any()


def tiny_sparse_cnn() -> SparseCNN:
    return SparseCNN(
        input_shape=(1, 28, 28),
        channels=(4, 8),
        conv_percent_on=(0.3, 0.3),
        batch_norm=False,
        hidden=32,
        hidden_percent_on=0.25,
        hidden_sparsity=0.5,
        output_sparsity=0.5,
        num_classes=10,
    )


@pytest.mark.parametrize(
    "settings", [dict(accumulate_grad_batches=3), dict(precision="bf16-mixed")], ids=["accumulate", "bf16"]
)
def test_masked_weights_stay_zero_through_a_lightning_fit(settings):
    pl.seed_everything(0, verbose=False)
    model = Classifier(tiny_sparse_cnn(), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-3))
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=7,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **settings,
    )
    before = model.net.hidden.linear.module.weight.detach().clone()
    trainer.fit(model, datamodule=Digits(batch_size=32))
    for sparse in (model.net.hidden.linear, model.net.output):
        assert masked_are_zero(sparse)
    assert not torch.equal(before, model.net.hidden.linear.module.weight)
