"""The plasticity study's seed stack: each member trains and is measured as its own trial through Lightning's loop
would, under every intervention the stack takes; the interventions it cannot take are named."""

import functools
import math

import pytest
import torch

from datamodules import Digits, TaskStream
from lightning_modules import Classifier
from lightning_modules.nets import MLP
from lightning_modules.studies.plasticity import StreamTrial
from lightning_modules.studies.stream_stack import StackedStreamTrial, stack_refusal, task_end_measures

SEEDS = [0, 1]


def model(optimizer=torch.optim.SGD, **options) -> Classifier:
    options = options or {"lr": 0.05, "momentum": 0.9}
    return Classifier(MLP(width=48), optimizer=functools.partial(optimizer, **options))


def stream(kind: str = "permuted_inputs") -> TaskStream:
    data = TaskStream(Digits(batch_size=32), kind=kind, tasks=3, steps_per_task=15, random_label_samples=200)
    data.setup()
    return data


def assert_same_rows(stacked: list[dict], looped: list[dict]) -> None:
    assert [(r["seed"], r["task"]) for r in stacked] == [(r["seed"], r["task"]) for r in looped]
    for a, b in zip(stacked, looped, strict=True):
        for column in ("acc_online", "acc_final", "dead", "dormant", "srank", "weight_norm", "stable_rank", "alpha"):
            if math.isnan(b[column]):
                assert math.isnan(a[column]), column
            else:
                assert a[column] == pytest.approx(b[column], rel=1e-4, abs=1e-6), (column, a, b)


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings, kind, optimizer",
    [
        ({}, "permuted_inputs", "sgd"),
        ({"l2_init": 0.01}, "permuted_labels", "adam"),
        ({"shrink": 0.8, "perturb": 0.1}, "random_labels", "sgd"),
        ({"shrink": 0.99, "perturb": 0.01, "shrink_perturb_every": "step"}, "permuted_inputs", "sgd"),
        ({"head_reset": True}, "permuted_labels", "adam"),
        ({"head_reset": True}, "permuted_inputs", "sgd"),
    ],
)
def test_each_stacked_member_trains_and_is_measured_as_its_own_trial(settings, kind, optimizer):
    net = model(torch.optim.Adam, lr=0.003) if optimizer == "adam" else model()
    data = stream(kind)
    looped = [row for seed in SEEDS for row in StreamTrial(net, data, device="cpu")("x", settings, seed)]
    stacked = StackedStreamTrial(net, data, device="cpu")("x", settings, SEEDS)
    assert_same_rows(stacked, looped)
    assert len({r["acc_online"] for r in stacked if r["task"] == 2}) == 2  # the seeds differ: their own draws


def test_the_measures_of_a_task_end_read_dead_and_dormant_units_from_the_activations():
    net = MLP(width=4, in_features=2, num_classes=2)
    with torch.no_grad():
        net.hidden.linear.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, -1], [0.01, 0]]))
        net.hidden.linear.bias.zero_()
    x = torch.tensor([[1.0, 2.0], [3.0, 1.0]]).view(2, 1, 1, 2)  # unit 2 never fires, unit 3 barely
    measures = task_end_measures(net, [(x, torch.tensor([0, 1]))])
    # E|h| = (2, 1.5, 0, 0.02), its mean 0.88: scores 2.27, 1.70, 0, 0.023; at tau 0.025 units 2 and 3 are dormant
    assert measures["dead"] == 0.25 and measures["dormant"] == 0.5
    assert measures["srank"] == 2  # two samples: at most two directions
    weights = torch.cat([net.hidden.linear.weight.flatten(), net.out.weight.flatten()]).detach()
    assert measures["weight_norm"] == pytest.approx(float(weights.norm()))


def test_trials_the_stack_cannot_train_as_one_say_why():
    data = stream()
    assert stack_refusal(model(), {"l2_init": 0.1}, data) is None
    assert "continual backprop" in stack_refusal(model(), {"cbp": True}, data)
    with_bn = Classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 8), torch.nn.BatchNorm1d(8)))
    assert "batch norm" in stack_refusal(with_bn, {}, data)
