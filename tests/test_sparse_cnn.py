"""SparseCNN: the spec's nets and the three nets the original study compared, their counts, dead k-winners."""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from callbacks import DeadUnits
from lightning_modules import Classifier
from lightning_modules.counting import count
from lightning_modules.layers import KWinners, KWinners2d, SparseWeights
from lightning_modules.nets import SparseCNN
from lightning_modules.run.config_files import net_from_config
from tests.conftest import CONFIGS, TinyImages, cli

KW = CONFIGS / "kwinners"


def kinds(block: nn.Module) -> list[str]:
    return [type(m).__name__ for m in block.children()]


def stacked_net(*configs) -> SparseCNN:
    """The net of stacked configs, as the CLI resolves them (`count` builds it and nothing else)."""
    args = [a for c in configs for a in ("--config", str(c))]
    return cli("count", *args).model.net


def test_the_three_nets_of_the_original_comparison():
    paper = stacked_net(KW / "gsc_sparse.yaml")
    own = stacked_net(KW / "gsc_sparse.yaml", KW / "variants" / "study_copy.yaml")
    colleague = stacked_net(KW / "gsc_sparse.yaml", KW / "variants" / "colleague.yaml")
    block = ["Conv2d", "BatchNorm2d", "MaxPool2d", "KWinners2d"]
    assert kinds(paper.features.block1) == kinds(paper.features.block2) == block
    assert kinds(own.features.block1) == ["Conv2d", "BatchNorm2d", "KWinners2d", "MaxPool2d"]  # k-winners, then pool
    assert kinds(colleague.features.block1) == block
    assert paper.winners() == {
        "features.block1.act": (1192, 12544),
        "features.block2.act": (200, 1600),
        "hidden.act": (100, 1000),
    }
    assert own.winners()["features.block1.act"] == (round(64 * 28 * 28 * 0.095), 64 * 28 * 28)
    assert isinstance(paper.hidden.linear, SparseWeights) and paper.hidden.linear.keep == 640  # 40% of 1600
    assert isinstance(own.hidden.linear, nn.Linear)  # the study's copy: dense hidden weights
    assert colleague.hidden.linear.module.out_features == 1500 and colleague.winners()["hidden.act"] == (100, 1500)
    assert isinstance(colleague.output, SparseWeights) and isinstance(paper.output, nn.Linear)
    for net in (paper, own):
        assert sum(p.numel() for p in net.parameters()) == 1717140
        assert all(not m.affine for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    kw = [m for m in paper.modules() if isinstance(m, (KWinners, KWinners2d))]
    assert len(kw) == 3 and all(m.initial_boost_strength == 1.5 and m.boost_strength_factor == 0.9 for m in kw)
    assert all(m.k_inference_factor == 1.5 and m.duty_cycle_period == 1000 for m in kw)


def test_the_papers_mnist_and_super_sparse_nets():
    sparse = net_from_config(KW / "mnist_sparse.yaml")
    assert sparse.winners() == {
        "features.block1.act": (400, 4608),
        "features.block2.act": (300, 1024),
        "hidden.act": (100, 700),
    }
    assert sparse.hidden.linear.keep == round(0.3 * 1024) and not any(
        isinstance(m, nn.BatchNorm2d) for m in sparse.modules()
    )
    dense = net_from_config(KW / "mnist_dense.yaml")
    assert [m.out_channels for m in dense.modules() if isinstance(m, nn.Conv2d)] == [30, 30]
    assert dense.hidden.linear.in_features == 480 and not dense.winners()
    super_sparse = net_from_config(KW / "gsc_super_sparse.yaml")
    assert super_sparse.hidden.linear.keep == 160 and super_sparse.winners()["hidden.act"] == (100, 1500)
    assert sum(p.numel() for p in super_sparse.parameters()) == 2523640


def test_count_treats_kwinners_as_activations_and_notes_the_nonzero_mult_adds():
    net = net_from_config(KW / "gsc_sparse.yaml")
    result = count(net, (1, 32, 32))
    conv1, kw1, conv2, kw2 = 64 * 28 * 28 * 25, 64 * 14 * 14, 64 * 10 * 10 * 64 * 25, 64 * 5 * 5
    hidden, kw3, output = 1600 * 1000 + 1000, 1000, 1000 * 12 + 12
    assert result.mult_adds == conv1 + kw1 + conv2 + kw2 + hidden + kw3 + output == 13_122_556
    assert result.nonzero_mult_adds == result.mult_adds - 960 * 1000  # 960 of 1,600 weights per unit are zero
    assert result.params == result.sanity_params == 1_717_140
    assert "Note: with only the non-zero weights (sparse weights), mult-adds are 1.21626E+07" in result.summary()
    dense = count(net_from_config(KW / "gsc_dense.yaml"), (1, 32, 32))
    assert dense.mult_adds == result.mult_adds and "Note" not in dense.summary()


def test_a_kwinners_unit_that_never_wins_is_dead():
    """Five of six hidden units win; unit 0 gets a bias of -100 and the others +100, so it never wins."""
    torch.manual_seed(0)
    net = SparseCNN(
        input_shape=(1, 8, 8),
        channels=(4,),
        conv_percent_on=(0.5,),
        kernel_size=3,
        batch_norm=False,
        hidden=6,
        hidden_percent_on=0.5,
        hidden_sparsity=0.0,
        num_classes=10,
        boost_strength=0.0,
    )
    with torch.no_grad():
        net.hidden.linear.bias.copy_(torch.tensor([-100.0, 100, 100, 100, 100, 100]))
    images = torch.randint(0, 256, (40, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    trainer = pl.Trainer(
        logger=False, callbacks=[DeadUnits(split="test")], enable_progress_bar=False, enable_model_summary=False
    )
    trainer.test(Classifier(net, channels_last=False), datamodule=TinyImages(images, batch_size=8))
    metrics = trainer.callback_metrics
    assert metrics["dead/hidden"].item() == 1
    assert "dead/features.block1" in metrics  # the conv k-winners are watched too


@pytest.mark.parametrize("config", sorted(KW.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_kwinners_net_runs_forward_without_nan(config):
    net = net_from_config(config)
    shape = net.features.block1.conv.in_channels, *((32, 32) if "gsc" in config.stem else (28, 28))
    out = net.train()(torch.randn(4, *shape))
    assert out.shape == (4, 12 if "gsc" in config.stem else 10) and torch.isfinite(out).all()


def test_weights_that_happen_to_be_zero_are_not_sparse_weights():
    """The note comes from SparseWeights masks: a dense net with exact zeros (some randomly initialised weights
    are, in WRN-28-10) is counted dense and gets no note."""
    dense = net_from_config(KW / "gsc_dense.yaml")
    with torch.no_grad():
        dense.features.block1.conv.weight[:, 0] = 0.0
    result = count(dense, (1, 32, 32))
    assert result.nonzero_mult_adds == result.mult_adds and "Note" not in result.summary()
