"""TrainingDynamics on a hand-built net: gradient and weight norms, update ratios and learning rates equal what is
computed here by hand, on the steps asked for, with gradient accumulation, fused optimizers and mixed precision."""

import copy
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import Logger
from pytorch_lightning.plugins.precision import MixedPrecision
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


def fit(
    callback, steps: int, optimizer=None, batch_size: int = 16, network: nn.Module | None = None, **trainer_args
) -> tuple[Recorded, Classifier]:
    recorded = Recorded()
    sgd = partial(torch.optim.SGD, lr=0.1)
    model = Classifier(network or net(), optimizer=optimizer or sgd, num_classes=3, channels_last=False)
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


def float16_with_a_real_scaler() -> MixedPrecision:
    """16-mixed as on a GPU, with its GradScaler (65536 at first), on the CPU: Lightning's own `precision="16-mixed"`
    turns into bf16-mixed on a CPU, without a scaler."""
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("fused", [False, True], ids=["unscaled_by_lightning", "fused_unscales_in_its_step"])
def test_under_float16_mixed_precision_the_norms_are_of_the_unscaled_gradients(fused):
    """The loss is scaled before backward. Lightning unscales the gradients before `on_before_optimizer_step`, except
    for an optimizer that unscales them in its own step (fused Adam and AdamW): then the callback divides by the
    scale."""
    adam = partial(torch.optim.Adam, lr=0.01, fused=fused)
    recorded, _ = fit(
        TrainingDynamics(every_n_steps=1), steps=2, optimizer=adam, plugins=[float16_with_a_real_scaler()]
    )
    _, weight_grad, bias_grad = first_step_by_hand()
    both = torch.cat([weight_grad.flatten(), bias_grad]).norm().item()
    assert recorded.rows[0]["grad_norm/total"] == pytest.approx(both, rel=0.01)
    assert recorded.rows[0]["grad_norm/1"] == pytest.approx(both, rel=0.01)
    assert recorded.rows[1]["update_ratio/1"] > 0  # the scaler found the gradients finite and the step was taken


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: 16-mixed with Lightning's own GradScaler")
def test_fused_adam_under_float16_mixed_precision_on_a_gpu_logs_the_unscaled_norms():
    fused = partial(torch.optim.AdamW, lr=0.01, fused=True)
    recorded, _ = fit(TrainingDynamics(every_n_steps=1), steps=1, optimizer=fused, precision="16-mixed",
                      accelerator="gpu", devices=1)  # fmt: skip
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


def test_with_sparse_weights_the_gradient_norms_leave_out_the_masked_entries():
    """A 90%-sparse layer: its masked entries get gradient, but the optimizer step never moves them (they are set to
    zero again), so the norms are those of grad x mask."""
    torch.manual_seed(0)
    network = nn.Sequential(nn.Flatten(), nn.Linear(4, 20), SparseWeights(nn.Linear(20, 3), sparsity=0.9, seed=0))
    by_hand = copy.deepcopy(network)
    recorded, _ = fit(TrainingDynamics(every_n_steps=1), steps=1, network=network)
    data = Fixed()
    data.setup("fit")
    x, y = data.splits["train"].images.float() / 255, data.splits["train"].labels
    F.cross_entropy(by_hand(x), y).backward()
    first, sparse = by_hand[1], by_hand[2]
    masked = sparse.module.weight.grad * sparse.weight_mask
    layer = torch.cat([masked.flatten(), sparse.module.bias.grad]).norm().item()
    total = torch.cat([first.weight.grad.flatten(), first.bias.grad, masked.flatten(), sparse.module.bias.grad]).norm()
    assert recorded.rows[0]["grad_norm/2.module"] == pytest.approx(layer, rel=1e-5)
    assert recorded.rows[0]["grad_norm/total"] == pytest.approx(total.item(), rel=1e-5)
    unmasked = torch.cat([sparse.module.weight.grad.flatten(), sparse.module.bias.grad]).norm().item()
    assert unmasked > 1.5 * layer  # what the norm was before: most of it on entries that never move


def test_sparse_weights_report_the_real_tensor_and_a_bad_selection_is_one_line():
    torch.manual_seed(0)
    sparse = SparseWeights(nn.Linear(4, 3), sparsity=0.5)
    callback = TrainingDynamics(names=("*",))
    callback.setup(None, Classifier(nn.Sequential(nn.Flatten(), sparse)), "fit")
    assert list(callback.layers) == ["1.module"] and callback.layers["1.module"].weight is sparse.module.weight
    with pytest.raises(ValueError, match=r"no layer with weights matches names \['nothing'\]"):
        TrainingDynamics(names=("nothing",)).setup(None, Classifier(net()), "fit")
