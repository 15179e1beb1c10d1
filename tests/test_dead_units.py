"""DeadUnits: exact counts on a net whose every activation is known, the original's format, padding."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DistributedSampler

from callbacks import DeadUnits
from callbacks.activation_observer import ActivationObserver, samples_on_rank, select_layers
from callbacks.dead_units import consumer_keyed
from datamodules.tensor_data import ShardedOrder
from lightning_modules import Classifier
from lightning_modules.nets import VGG
from tests.conftest import CONFIGS, QUIET, TinyImages, fit_quickstart, probe_images, probe_net


def run_test(callback: pl.Callback, batch_size: int = 4) -> dict[str, float]:
    trainer = pl.Trainer(logger=False, callbacks=[callback], enable_progress_bar=False, enable_model_summary=False)
    trainer.test(Classifier(probe_net(), channels_last=False), datamodule=TinyImages(probe_images(), batch_size))
    return {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("dead/")}


def test_counts_units_that_never_fire_over_the_whole_split():
    metrics = run_test(DeadUnits(split="test"))
    assert metrics["dead/features"] == 2 and metrics["dead/hidden"] == 1
    assert metrics["dead/total"] == 3 and metrics["dead/fraction"] == pytest.approx(3 / 7)


def test_threshold_and_max_batches():
    # hidden unit 2 peaks at 0.1 / 16 (one hot pixel averaged over 16): dead above that threshold
    assert run_test(DeadUnits(split="test", threshold=0.05))["dead/total"] == 4
    # the first batch (images 0-3) lacks the 255 pixel: conv unit 3 and hidden unit 2 look dead
    assert run_test(DeadUnits(split="test", max_batches=1))["dead/total"] == 5


def test_names_pick_layers_and_types_none_takes_any_module():
    metrics = run_test(DeadUnits(split="test", names=["hidden"]))
    assert "dead/features" not in metrics and metrics["dead/total"] == 1
    layers = select_layers(probe_net(), None, ["features.conv", "head"])
    assert list(layers) == ["features", "head"]  # a block's part is reported under the block's name
    with pytest.raises(ValueError, match="no module"):
        run_test(DeadUnits(split="test", names=["nothing*"]))


def test_a_block_chosen_with_its_parts_gives_every_module_a_name_of_its_own():
    net = probe_net()
    layers = select_layers(net, None, ["features*"])  # the block, its conv and its activation
    assert layers == {"features": net.features, "features.conv": net.features.conv, "features.act": net.features.act}
    metrics = run_test(DeadUnits(split="test", types=None, names=["features*", "hidden.act"]))
    # three modules, three counts (before, the last of them overwrote the others under one name)
    assert {k: v for k, v in metrics.items() if k.startswith("dead/features")} == {
        "dead/features": 2, "dead/features.conv": 2, "dead/features.act": 2,
    }  # fmt: skip
    assert metrics["dead/hidden"] == 1 and metrics["dead/total"] == 7


def test_own_pass_over_another_split_uses_evaluation_order(tmp_path):
    data = TinyImages(probe_images(), batch_size=4)
    callback = DeadUnits(split="test")  # validate: its own pass over the test split at the validation epoch end
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[callback],
        max_epochs=1,
        limit_train_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.validate(Classifier(probe_net(), channels_last=False), datamodule=data)
    assert callback.counts == {"features": (2, 4), "hidden": (1, 3)}


def test_padded_samplers_count_each_sample_once():
    assert samples_on_rank(type("L", (), {"sampler": ShardedOrder(5, True, 0, rank=1, world_size=2, pad=True)})) == 2
    sampler = DistributedSampler(list(range(5)), num_replicas=2, rank=1, shuffle=False)
    assert len(sampler) == 3 and samples_on_rank(type("L", (), {"sampler": sampler})) == 2
    observer = ActivationObserver()
    observer.start = lambda: None
    observer._begin(remaining=5)
    taken = []
    for batch_idx in range(3):
        observer._count_batch((torch.zeros(4),), batch_idx)
        taken.append(observer._take)
    observer._detach()
    assert taken == [4, 1, 0]


def test_consumer_keyed_format_of_the_original():
    net = VGG(
        [
            ("conv1_1", (4, None)),
            ("pool1", (2, 2)),
            ("conv2_1", (8, None)),
            ("fc6", (16, 0.5)),
            ("logit", (None, None)),
        ],
        in_channels=3,
        input_size=4,
    )
    layers = select_layers(net, ["ReLU"], ["*"])
    counts = {"conv1_1": (1, 4), "conv2_1": (3, 8), "fc6": (5, 16)}
    assert consumer_keyed(net, layers, counts) == {
        "conv1_1/0": (0, 3),
        "conv2_1/0": (1, 4),
        "fc6/0": (3, 8),
        "logit": (5, 16),
    }


def test_quickstart_prints_and_saves_the_per_layer_table(in_tmp, capsys):
    trainer = fit_quickstart()
    assert "dead/total" in trainer.callback_metrics and "dead/features.0" in trainer.callback_metrics
    folder = in_tmp / "runs" / "quickstart" / "version_0"
    assert (folder / "dead_units.png").stat().st_size > 1000
    assert "dead/total" in (folder / "metrics.csv").read_text().splitlines()[0]
    out = capsys.readouterr().out
    assert "dead units (val, epoch 0" in out and "total" in out


def test_a_layer_pattern_that_matches_nothing_is_one_clear_line(in_tmp):
    from lightning_modules.run.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "quickstart.yaml"),
                "--trainer.callbacks+=callbacks.DeadUnits",
                "--trainer.callbacks.names",
                "[conv9_*]",
                *QUIET,
            ]
        )
    assert str(exit_.value.code).startswith("error: DeadUnits: no module of types") and "conv9_*" in str(
        exit_.value.code
    )


@pytest.mark.parametrize("max_epochs, max_steps", [(3, -1), (-1, 3)], ids=["by_epochs", "by_steps"])
def test_the_last_validation_of_a_fit_is_observed_whether_it_ends_by_epochs_or_by_steps(
    tmp_path, max_epochs, max_steps
):
    """every_n_epochs 5 over a 3-epoch fit (one batch an epoch): only the last epoch is due. Under
    configs/presets/original_steps.yaml max_epochs is -1 and the fit ends by max_steps."""
    steps = []

    class Recorded(DeadUnits):
        def finish(self, trainer, pl_module):
            steps.append(trainer.global_step)
            super().finish(trainer, pl_module)

    trainer = pl.Trainer(
        default_root_dir=tmp_path, logger=False, callbacks=[Recorded(every_n_epochs=5)], max_epochs=max_epochs,
        max_steps=max_steps, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(Classifier(probe_net(), channels_last=False), datamodule=TinyImages(probe_images(), batch_size=4))
    assert steps == [3]
