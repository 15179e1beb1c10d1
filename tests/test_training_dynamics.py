"""TrainingDynamics on a hand-built net: gradient and weight norms, update ratios and learning rates equal what is
computed here by hand, on the steps asked for, with gradient accumulation, fused optimizers and mixed precision."""

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import Logger
from torch import nn

from callbacks import TrainingDynamics
from datamodules.tensor_data import Split, TensorDataModule
from lightning_modules import Classifier
from lightning_modules.layers import SparseWeights


class Recorded(Logger):
    """Keeps what is logged, by step."""

    def __init__(self):
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    name, version, experiment = "recorded", 0, None

    def log_metrics(self, metrics, step=None):
        self.rows.setdefault(step, {}).update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class Fixed(TensorDataModule):
    """16 images of 1x2x2 and their labels, in batches of `batch_size` (one pass: the same order each epoch)."""

    mean, std, num_classes, input_shape = (0.0,), (1.0,), 3, (1, 2, 2)

    def __init__(self, batch_size: int = 16):
        super().__init__(batch_size=batch_size, val_size=1, on_device=False)

    def load(self):
        images = torch.arange(17 * 4, dtype=torch.uint8).view(17, 1, 2, 2) * 3
        return Split(images, torch.arange(17) % 3), None

    def train_dataloader(self):
        loader = super().train_dataloader()
        loader.sampler.shuffle = False
        return loader


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def fit(callback, steps: int, optimizer=None, batch_size: int = 16, **trainer_args) -> tuple[Recorded, Classifier]:
    recorded = Recorded()
    sgd = partial(torch.optim.SGD, lr=0.1)
    model = Classifier(net(), optimizer=optimizer or sgd, num_classes=3, channels_last=False)
    trainer = pl.Trainer(
        max_steps=steps, logger=[recorded], callbacks=[callback], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        **trainer_args,
    )  # fmt: skip
    trainer.fit(model, datamodule=Fixed(batch_size))
    return recorded, model


def first_step_by_hand() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """The first step's weights and its weight and bias gradients, by hand: cross-entropy on all 16 images."""
    linear = net()[1]
    data = Fixed()
    data.setup("fit")
    x, y = data.splits["train"].images.float().flatten(1) / 255, data.splits["train"].labels
    F.cross_entropy(linear(x), y).backward()
    return linear, linear.weight.grad, linear.bias.grad


def test_norms_update_ratio_and_learning_rate_are_the_hand_computed_ones():
    recorded, _ = fit(TrainingDynamics(every_n_steps=1), steps=2)
    linear, weight_grad, bias_grad = first_step_by_hand()
    row = recorded.rows[0]
    both = torch.cat([weight_grad.flatten(), bias_grad]).norm().item()
    assert row["grad_norm/1"] == pytest.approx(both, rel=1e-5)  # weight and bias of the layer
    assert row["grad_norm/total"] == pytest.approx(both, rel=1e-5)  # the only layer: the whole net
    assert row["weight_norm/1"] == pytest.approx(linear.weight.norm().item(), rel=1e-6)
    # plain SGD: W moves by lr x g, so the ratio is lr ||g_W|| / ||W||
    assert row["update_ratio/1"] == pytest.approx(
        0.1 * weight_grad.norm().item() / linear.weight.norm().item(), rel=1e-4
    )
    assert row["lr/base"] == pytest.approx(0.1)
    assert sorted(recorded.rows) == [0, 1]


def test_it_measures_every_n_steps_only_and_after_accumulating():
    recorded, _ = fit(TrainingDynamics(every_n_steps=2), steps=5)
    assert sorted(step for step, row in recorded.rows.items() if "grad_norm/total" in row) == [0, 2, 4]
    # two batches of 8 accumulated into one step: the gradient of the mean over both, as one batch of 16 gives it
    accumulated, _ = fit(TrainingDynamics(every_n_steps=1), steps=1, batch_size=8, accumulate_grad_batches=2)
    _, weight_grad, bias_grad = first_step_by_hand()
    both = torch.cat([weight_grad.flatten(), bias_grad]).norm().item()
    assert list(accumulated.rows) == [0] and accumulated.rows[0]["grad_norm/total"] == pytest.approx(both, rel=1e-5)


def test_under_float16_mixed_precision_the_norms_are_of_the_unscaled_gradients():
    """The loss is scaled (65536 at first) before backward; the norms are read after the gradients are unscaled."""
    recorded, _ = fit(TrainingDynamics(every_n_steps=1), steps=1, precision="16-mixed")
    _, weight_grad, bias_grad = first_step_by_hand()
    both = torch.cat([weight_grad.flatten(), bias_grad]).norm().item()
    assert recorded.rows[0]["grad_norm/total"] == pytest.approx(both, rel=0.01)


def test_fused_adam_and_bf16_mixed_precision():
    fused = partial(torch.optim.Adam, lr=0.01, fused=True)
    recorded, _ = fit(TrainingDynamics(every_n_steps=1), steps=2, optimizer=fused)
    assert recorded.rows[1]["update_ratio/1"] > 0
    recorded, _ = fit(TrainingDynamics(every_n_steps=1), steps=2, precision="bf16-mixed")
    _, weight_grad, bias_grad = first_step_by_hand()
    both = torch.cat([weight_grad.flatten(), bias_grad]).norm().item()
    assert recorded.rows[0]["grad_norm/total"] == pytest.approx(both, rel=0.05)  # bf16's rounding, not a scale


def test_sparse_weights_report_the_real_tensor_and_a_bad_selection_is_one_line():
    torch.manual_seed(0)
    sparse = SparseWeights(nn.Linear(4, 3), sparsity=0.5)
    callback = TrainingDynamics(names=("*",))
    callback.setup(None, Classifier(nn.Sequential(nn.Flatten(), sparse)), "fit")
    assert list(callback.layers) == ["1.module"] and callback.layers["1.module"].weight is sparse.module.weight
    with pytest.raises(ValueError, match=r"no layer with weights matches names \['nothing'\]"):
        TrainingDynamics(names=("nothing",)).setup(None, Classifier(net()), "fit")
