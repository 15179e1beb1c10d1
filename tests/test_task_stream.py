"""Task streams (datamodules/task_stream.py, spec 07): each task drawn from (seed, task) alone, applied to the
batches of the real in-memory loaders (the embedded digits), switching at the stream's own batch count."""

import csv
import math
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from callbacks import TaskAccuracy
from callbacks.training_dynamics import weighted_layers
from datamodules import Digits
from datamodules.task_stream import Tasks, TaskStream
from lightning_modules import Classifier
from lightning_modules.errors import ConfigError
from lightning_modules.nets import MLP
from tests.conftest import CONFIGS, QUIET, cli, cli_error, two_ranks

STEPS = 5  # training batches per task: 1,200 training digits in batches of 64 are 19 batches an epoch


def loaders(kind: str, tasks: int = 3, **kwargs) -> tuple[TaskStream, Digits]:
    stream, base = TaskStream(Digits(batch_size=64), kind, tasks, STEPS, seed=7, **kwargs), Digits(batch_size=64)
    torch.manual_seed(0)
    stream.setup("fit")
    torch.manual_seed(0)
    base.setup("fit")  # the same shuffling seed: the same samples in the same order
    return stream, base


def epochs(loader, count: int = 2):
    for epoch in range(count):
        loader.sampler.set_epoch(epoch)
        yield from loader


def test_each_task_is_drawn_from_the_seed_and_its_index_alone():
    tasks, again = Tasks("permuted_inputs", 5, seed=3), Tasks("permuted_inputs", 9, seed=3)
    assert tasks.pixel_order(0, 784) is None  # task 0: the data as it is
    orders = [tasks.pixel_order(t, 784) for t in range(1, 5)]
    assert all(torch.equal(o.sort().values, torch.arange(784)) for o in orders)  # permutations
    assert all(torch.equal(o, again.pixel_order(t, 784)) for t, o in enumerate(orders, start=1))
    assert len({tuple(o[:20].tolist()) for o in orders}) == 4  # a different one per task
    assert not torch.equal(Tasks("permuted_inputs", 5, seed=4).pixel_order(1, 784), orders[0])
    assert Tasks("permuted_inputs", 5, identity_first=False).pixel_order(0, 784) is not None
    assert (
        Tasks("permuted_labels", 5).pixel_order(1, 784) is None
        and Tasks("permuted_inputs", 5).class_order(1, 10) is None
    )


def test_permuted_inputs_gather_every_batchs_pixels_by_its_tasks_permutation():
    stream, base = loaders("permuted_inputs")
    seen = []
    for position, ((x, y), (bx, by)) in enumerate(
        zip(epochs(stream.train_dataloader()), epochs(base.train_dataloader()), strict=True)
    ):
        task = min(position // STEPS, 2)
        order = stream.tasks.pixel_order(task, 28 * 28)
        want = bx if order is None else bx.flatten(2)[:, :, order].view_as(bx)
        assert torch.equal(x, want) and torch.equal(y, by), position
        seen.append(task)
    assert seen[:STEPS] == [0] * STEPS and seen[STEPS : 2 * STEPS] == [1] * STEPS and seen[-1] == 2  # 38 batches


def test_permuted_labels_relabel_every_class_and_leave_the_images():
    stream, base = loaders("permuted_labels", tasks=4)
    for position, ((x, y), (bx, by)) in enumerate(
        zip(epochs(stream.train_dataloader()), epochs(base.train_dataloader()), strict=True)
    ):
        order = stream.tasks.class_order(min(position // STEPS, 3), 10)
        assert torch.equal(x, bx) and torch.equal(y, by if order is None else order[by]), position


def test_random_labels_train_and_evaluate_a_fixed_subset_with_each_tasks_labels():
    stream, _ = loaders("random_labels", random_label_samples=100)
    assert len(stream.splits["train"]) == 100
    loader = stream.train_dataloader()
    index = torch.arange(10)
    for position, task in ((0, 0), (STEPS - 1, 0), (STEPS, 1), (10 * STEPS, 2)):
        loader._position = position
        _, labels = loader.batch(index)
        assert torch.equal(labels, stream.tasks.random_labels(task, 100, 10)[index])
    evaluated = stream.val_dataloader()  # the subset, in order, labelled as the task being trained
    assert len(evaluated.split) == 100 and sum(len(y) for _, y in evaluated) == 100
    with pytest.raises(ConfigError, match="random_label_samples=5000: the training split holds 1200"):
        TaskStream(Digits(), "random_labels", random_label_samples=5000).setup("fit")


def test_a_loader_resumed_mid_epoch_goes_on_with_the_task_of_its_position():
    stream, base = loaders("permuted_inputs")
    loader, reference = stream.train_dataloader(), base.train_dataloader()
    loader.sampler.set_epoch(1), reference.sampler.set_epoch(1)
    loader.load_state_dict({"batches": 3}), reference.load_state_dict({"batches": 3})
    (x, _), (bx, _) = next(iter(loader)), next(iter(reference))
    task = min((len(loader) + 3) // STEPS, 2)  # batch 3 of epoch 1: position 22, task 2
    assert torch.equal(x, bx.flatten(2)[:, :, stream.tasks.pixel_order(task, 784)].view_as(bx))


def test_a_stream_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="kind must be one of permuted_inputs"):
        TaskStream(Digits(), "rotated")
    with pytest.raises(ConfigError, match="needs an in-memory datamodule"):
        TaskStream(object(), "permuted_inputs")


PERMUTED = CONFIGS / "plasticity" / "permuted_digits.yaml"
SHORT = ["--data.init_args.tasks", "3", "--data.init_args.steps_per_task", "10", "--trainer.max_steps", "30",
         "--trainer.val_check_interval", "10", *QUIET]  # fmt: skip


def test_a_fit_on_a_stream_logs_each_tasks_online_and_final_accuracy_at_its_validations_step(in_tmp):
    """lr 0: the net never changes, so a task's online accuracy is the net's accuracy over that task's ten training
    batches, counted here again from the stream's own loader; the final accuracy is the validation's."""
    trainer = cli("fit", "--config", PERMUTED, *SHORT, "--model.init_args.optimizer.init_args.lr", "0").trainer
    rows = list(
        csv.DictReader((in_tmp / "runs" / "plasticity" / "permuted_digits" / "version_0" / "metrics.csv").open())
    )
    tasks = [r for r in rows if r.get("task/index")]
    assert [(r["step"], r["task/index"]) for r in tasks] == [("9", "0.0"), ("19", "1.0"), ("29", "2.0")]
    at_step = {}
    for row in rows:  # each logger call is a row of its own: merged per step
        at_step.setdefault(row["step"], {}).update({k: v for k, v in row.items() if v})
    assert all(
        at_step[r["step"]]["val/acc"] == r["task/acc_final"] and "dead/total" in at_step[r["step"]] for r in tasks
    )
    stream, net = trainer.datamodule, trainer.lightning_module.net.eval()
    loader = stream.train_dataloader()
    correct = [0, 0, 0]
    seen = [0, 0, 0]
    with torch.no_grad():
        for position, (x, y) in enumerate(epochs(loader, 3)):
            if position < 30:
                task = stream.task_at(position)
                correct[task] += int((net(x).argmax(1) == y).sum())
                seen[task] += len(y)
    for task, row in enumerate(tasks):
        assert float(row["task/acc_online"]) == pytest.approx(correct[task] / seen[task], abs=1e-6)
    norms = {f"task/weight_norm/{name}": float(m.weight.norm()) for name, m in weighted_layers(net).items()}
    assert sorted(norms) == ["task/weight_norm/hidden", "task/weight_norm/out"]
    for row in tasks:  # the weights at each task's end: here the initial ones, which lr 0 never changes
        assert {k: float(row[k]) for k in norms} == pytest.approx(norms, rel=1e-6)
        assert float(row["task/weight_norm"]) == pytest.approx(math.hypot(*norms.values()), rel=1e-6)


def test_a_stream_whose_trainer_does_not_stop_or_validate_at_task_ends_is_refused_in_one_line(in_tmp, capsys):
    error = cli_error("fit", "--config", PERMUTED, *SHORT, "--trainer.max_steps", "40", capsys=capsys)
    assert "a stream of 3 tasks of 10 steps trains 30 steps: set trainer.max_steps: 30 (it is 40)" in error
    error = cli_error("fit", "--config", PERMUTED, *SHORT, "--trainer.val_check_interval", "5", capsys=capsys)
    assert "validates at each task's end: set trainer.val_check_interval: 10" in error
    assert not (in_tmp / "runs").exists() or not list((in_tmp / "runs").rglob("*.ckpt"))


def stream_fit(folder: str, devices: int, batch_size: int) -> None:
    """15 steps of lr 0 over a 3-task stream, the task accuracies logged to `folder`'s metrics.csv."""
    pl.seed_everything(0, verbose=False)  # the shuffling seed every rank takes from rank 0
    torch.set_num_threads(1)
    stream = TaskStream(Digits(batch_size=batch_size), "permuted_inputs", tasks=3, steps_per_task=5, seed=5)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=15,
        val_check_interval=5, check_val_every_n_epoch=None, callbacks=[TaskAccuracy()],
        logger=CSVLogger(folder, name="", version=""), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    net = MLP(width=32)
    trainer.fit(Classifier(net, optimizer=partial(torch.optim.SGD, lr=0.0), channels_last=False), datamodule=stream)


def stream_rank(rank: int, folder: str) -> None:
    stream_fit(folder, devices=2, batch_size=64)


def task_rows(folder: Path) -> list[tuple[str, str]]:
    rows = csv.DictReader((folder / "metrics.csv").open())
    return [(r["task/index"], r["task/acc_online"]) for r in rows if r.get("task/index")]


@pytest.mark.subprocess
def test_two_ranks_count_each_tasks_online_accuracy_as_one_process_with_their_batches_together(tmp_path):
    """Rank r trains samples r, r + 2, ... of each shuffled order in batches of 64: at every position the two
    ranks' batches are together one process's batch of 128, of the same task. With lr 0 the summed counts equal it."""
    two_ranks(stream_rank, str(tmp_path / "ddp"))
    stream_fit(str(tmp_path / "one"), devices=1, batch_size=128)
    together, alone = task_rows(tmp_path / "ddp"), task_rows(tmp_path / "one")
    assert [t for t, _ in alone] == ["0.0", "1.0", "2.0"] and len({a for _, a in alone}) == 3
    assert together == alone
