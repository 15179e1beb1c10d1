"""DeadUnits: exact counts on a net whose every activation is known, the original's format, padding."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from callbacks import ActivationStats, DeadUnits
from callbacks.activation_observer import ActivationObserver, samples_on_rank, select_layers
from callbacks.dead_units import consumer_keyed
from datamodules.tensor_data import ShardedOrder
from lightning_modules import Classifier
from lightning_modules.layers import KWinners
from lightning_modules.nets import VGG
from tests.conftest import CONFIGS, QUIET, TinyImages, fit_quickstart, probe_images, probe_net, two_ranks


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


class SaturatingBranches(nn.Module):
    """Two 1x1 convs over the image x / 255 (in [0, 0.79], one pixel 1.0), one into tanh and one into ELU, with every
    unit's pre-activation range set by hand: z = w x + b."""

    TANH = ((0.35, -1.42), (0.0, -3.0), (1.0, 0.0), (0.0, 3.0))  # h in [-0.89, -0.79]; -0.995; [0, 0.76]; +0.995
    ELU = ((0.5, -1.6), (0.0, -4.0), (1.0, 0.0), (1.0, -0.2))  # h in [-0.80, -0.67]; -0.982; [0, 1]; [-0.18, 0.8]

    def __init__(self):
        super().__init__()
        self.tanh_conv, self.tanh = nn.Conv2d(1, 4, 1), nn.Tanh()
        self.elu_conv, self.elu = nn.Conv2d(1, 4, 1), nn.ELU()
        for conv, units in ((self.tanh_conv, self.TANH), (self.elu_conv, self.ELU)):
            with torch.no_grad():
                conv.weight.copy_(torch.tensor([w for w, _ in units]).view(4, 1, 1, 1))
                conv.bias.copy_(torch.tensor([b for _, b in units]))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = torch.cat([self.tanh(self.tanh_conv(x)), self.elu(self.elu_conv(x))], dim=1)
        return self.head(both.mean(dim=(2, 3)))


def slopes_by_hand() -> dict[str, torch.Tensor]:
    """|phi'(z)| of every unit at every pixel of every probe image, (units, entries)."""
    x = probe_images().float().flatten() / 255
    z = {name: torch.stack([w * x + b for w, b in units]) for name, units in
         (("tanh", SaturatingBranches.TANH), ("elu", SaturatingBranches.ELU))}  # fmt: skip
    return {"tanh": 1 - torch.tanh(z["tanh"]) ** 2, "elu": torch.where(z["elu"] > 0, 1.0, torch.exp(z["elu"]))}


def test_a_tanh_or_elu_unit_is_dead_when_it_passes_no_gradient_on_any_input_not_when_it_stays_negative():
    """Tanh unit 0 (outputs in [-0.89, -0.79]) and ELU unit 0 (negative on every input) pass gradient everywhere:
    alive. Tanh units 1 and 3 (saturated at -0.995 and +0.995) and ELU unit 1 (-0.982) pass none: dead."""
    callback = DeadUnits(split="test")
    trainer = pl.Trainer(logger=False, callbacks=[callback], enable_progress_bar=False, enable_model_summary=False)
    trainer.test(Classifier(SaturatingBranches(), channels_last=False), datamodule=TinyImages(probe_images(), 4))
    slopes = slopes_by_hand()
    dead = {name: [i for i, unit in enumerate(slope) if bool((unit <= 0.05).all())] for name, slope in slopes.items()}
    assert dead == {"tanh": [1, 3], "elu": [1]}  # the hand-set ranges do what they say
    assert {name: units.nonzero().flatten().tolist() for name, units in callback.dead.items()} == dead
    assert callback.counts == {"tanh": (2, 4), "elu": (1, 4)}
    assert trainer.callback_metrics["dead/total"] == 3 and trainer.callback_metrics["dead/fraction"] == 3 / 8


def test_a_kwinners_unit_is_dead_when_it_never_wins_even_if_the_winners_output_is_negative():
    """Every sample's input to the k-winners layer is (-1, -2, -3, -4): unit 0 wins every time with output -1."""
    linear = nn.Linear(16, 4)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([-1.0, -2.0, -3.0, -4.0]))
    callback = DeadUnits(split="test", types=("KWinners",))
    trainer = pl.Trainer(logger=False, callbacks=[callback], enable_progress_bar=False, enable_model_summary=False)
    net = nn.Sequential(nn.Flatten(), linear, KWinners(4, percent_on=0.25), nn.Linear(4, 10))
    trainer.test(Classifier(net, channels_last=False), datamodule=TinyImages(probe_images(), batch_size=4))
    assert callback.dead["2"].tolist() == [False, True, True, True] and callback.counts == {"2": (3, 4)}


def test_the_printed_table_says_which_definition_each_layer_gets(capsys):
    """Layers of one rule: said once, in the title; of several: on every row."""
    trainer = pl.Trainer(logger=False, callbacks=[DeadUnits(split="test")], enable_progress_bar=False)
    trainer.test(Classifier(SaturatingBranches(), channels_last=False), datamodule=TinyImages(probe_images(), 4))
    (title,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("dead units")]
    assert title.endswith("units that pass no gradient on any input (saturated: |phi'| <= 0.05 everywhere)")
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 10))
    trainer = pl.Trainer(logger=False, callbacks=[DeadUnits(split="test")], enable_progress_bar=False)
    trainer.test(Classifier(net, channels_last=False), datamodule=TinyImages(probe_images(), 4))
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert rows["2"].endswith("off: never > 0") and rows["4"].endswith("saturated: |phi'| <= 0.05 everywhere")


def test_with_validation_off_an_activation_callback_says_in_one_line_that_it_observes_nothing(tmp_path, capsys):
    trainer = pl.Trainer(
        default_root_dir=tmp_path, logger=False, callbacks=[DeadUnits(), ActivationStats(split="test")], max_steps=1,
        limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Classifier(probe_net(), channels_last=False), datamodule=TinyImages(probe_images(), batch_size=4))
    lines = [line for line in capsys.readouterr().out.splitlines() if "observes nothing" in line]
    assert len(lines) == 2 and all("limit_val_batches" in line for line in lines), lines
    assert lines[0].startswith("DeadUnits") and lines[1].startswith("ActivationStats")


def test_the_table_starts_on_a_line_of_its_own_after_a_progress_bar_written_to_a_file(tmp_path, capsys):
    """Captured output is not a terminal: the progress bar's last write ends without a newline."""
    trainer = pl.Trainer(
        default_root_dir=tmp_path, logger=False, callbacks=[DeadUnits()], max_steps=1, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(Classifier(probe_net(), channels_last=False), datamodule=TinyImages(probe_images(), batch_size=4))
    out = capsys.readouterr().out
    assert "it/s]" in out  # the bar was drawn into the same output
    assert "\ndead units (val, epoch 0, step 0): " in out


def observed_alone(rank: int, folder: str) -> None:
    """One of 2 DDP ranks (gloo) validating on 1 sample: Lightning's sampler gives rank 1 a repeat of it, which the
    callbacks cut off, so rank 1 observes nothing. What each rank's callbacks hold is saved for the test."""
    torch.set_num_threads(1)
    dead, stats = DeadUnits(), ActivationStats(pca_samples=4)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", logger=False, callbacks=[dead, stats],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.validate(Classifier(SaturatingBranches(), channels_last=False), dataloaders=one_sample())
    torch.save(held_by(dead, stats), Path(folder) / f"rank{rank}.pt")


def one_sample() -> DataLoader:
    return DataLoader(TensorDataset(probe_images()[:1].float() / 255, torch.zeros(1, dtype=torch.long)), batch_size=4)


def held_by(dead: DeadUnits, stats: ActivationStats) -> dict:
    return {
        "dead": dead.dead, "counts": {k: torch.tensor(v) for k, v in dead.counts.items()}, "peaks": dead.peaks,
        "health": {k: torch.tensor(v) for k, v in dead.health_scalars.items()},
        "means": {k: torch.from_numpy(v) for k, v in stats.means.items()},
        "variances": {k: torch.from_numpy(v) for k, v in stats.variances.items()},
        "summaries": {f"{k}/{key}": torch.tensor(v) for k, row in stats.summaries.items() for key, v in row.items()},
    }  # fmt: skip


@pytest.mark.subprocess
def test_a_rank_that_sees_no_sample_enters_every_collective_and_both_count_as_one_process(tmp_path):
    two_ranks(observed_alone, str(tmp_path))
    dead, stats = DeadUnits(), ActivationStats(pca_samples=4)
    trainer = pl.Trainer(logger=False, callbacks=[dead, stats], enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(Classifier(SaturatingBranches(), channels_last=False), dataloaders=one_sample())
    alone = held_by(dead, stats)
    assert alone["counts"]["tanh"].tolist() == [2, 4]  # the one sample shows the hand-set units
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got.keys() == alone.keys()
        for key, expected in alone.items():
            assert got[key].keys() == expected.keys(), key
            for name, value in expected.items():
                torch.testing.assert_close(got[key][name], value, rtol=1e-6, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize(
    "callback, limit, said",
    [(DeadUnits(), 1, "observes nothing in test: it observes the val split"),
     (ActivationStats(split="train"), 1, "observes nothing in test: it observes the train split"),
     (DeadUnits(split="test"), 0, "observes nothing: --trainer.limit_test_batches 0")],
)  # fmt: skip
def test_in_test_a_callback_that_observes_another_split_says_so_in_one_line(callback, limit, said, capsys):
    trainer = pl.Trainer(logger=False, callbacks=[callback], limit_test_batches=limit, enable_progress_bar=False)
    trainer.test(Classifier(probe_net(), channels_last=False), datamodule=TinyImages(probe_images(), batch_size=4))
    lines = [line for line in capsys.readouterr().out.splitlines() if "observes nothing" in line]
    assert len(lines) == 1 and said in lines[0], lines
    assert not getattr(callback, "counts", None) and not getattr(callback, "summaries", None)  # indeed nothing
