"""Attention transfer and the Student: the maps and losses by hand, a frozen teacher, AT falling, errors."""

from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml

from datamodules import Digits
from lightning_modules import Classifier, ConfigError, Student
from lightning_modules.distillation import distillation_loss, teacher_hint
from lightning_modules.layers.attention_transfer import AttentionTransfer, attention_loss, attention_map
from lightning_modules.nets import WideResNet
from lightning_modules.studies.trials import bare_trainer
from tests.conftest import CONFIGS, ROOT

SGD = partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)


def small_wrn(conv: str = "Conv") -> WideResNet:
    return WideResNet(10, 2, in_channels=1, conv=conv)


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """A WRN-10-2 teacher trained for two epochs on the embedded digits, saved as a Lightning checkpoint; once per
    test process (a worker that runs this module's tests between others' keeps it)."""
    pl.seed_everything(0)
    trainer = bare_trainer(2)
    trainer.fit(Classifier(small_wrn(), optimizer=SGD), Digits(batch_size=64))
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    return path


def test_attention_maps_and_loss_by_hand():
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0, 0, 0], x[0, 1, 1, 1] = 2.0, 2.0  # channel means of x^2: 2 at two corners, 0 elsewhere
    torch.testing.assert_close(attention_map(x), torch.tensor([[2**-0.5, 0, 0, 2**-0.5]]))
    y = torch.zeros(1, 3, 2, 2)
    y[0, :, 0, 0] = 1.0  # all attention on one corner
    expected = ((2**-0.5 - 1) ** 2 + 0.5) / 4
    assert attention_loss(x, y).item() == pytest.approx(expected)
    assert attention_loss(y, 5 * y).item() == 0  # scale-free: maps are normalised
    with pytest.raises(ValueError, match="one size"):
        attention_loss(x, torch.zeros(1, 2, 4, 4))


def test_attention_transfer_hooks_taps_of_both_nets():
    student, teacher = small_wrn("Shuffle_4"), small_wrn()
    transfer = AttentionTransfer(("group1", "group3"))
    transfer.attach(student, teacher)
    x = torch.randn(2, 1, 28, 28)
    student(x), teacher(x)
    losses = transfer.losses()
    assert list(losses) == ["group1", "group3"] and all(v > 0 for v in losses.values())
    with pytest.raises(RuntimeError, match="one forward pass"):
        transfer.losses()  # the activations were consumed
    transfer.detach()
    by_hand = [net.group3(net.group2(net.group1(net.stem(x)))) for net in (student, teacher)]
    assert losses["group3"].item() == pytest.approx(attention_loss(*by_hand).item(), rel=1e-5)
    with pytest.raises(ValueError, match="no module named"):
        AttentionTransfer(("group4",)).attach(student, teacher)


def test_distillation_loss_is_zero_for_the_teachers_logits_and_grows_apart():
    logits = torch.randn(4, 10)
    assert distillation_loss(logits, logits, 4.0).abs().item() < 1e-6
    assert distillation_loss(logits, -logits, 4.0).item() > 0.1


class EpochLog(pl.Callback):
    """The train/ metrics of every finished epoch (they are logged after validation, so read them a step later)."""

    def __init__(self):
        self.epochs: list[dict[str, float]] = []

    def record(self, trainer: pl.Trainer) -> None:
        metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        if metrics:
            self.epochs.append(metrics)

    def on_train_epoch_start(self, trainer, pl_module):
        self.record(trainer)

    def on_fit_end(self, trainer, pl_module):
        self.record(trainer)


def train_student(checkpoint: Path, beta: float, epochs: int = 3) -> tuple[Student, EpochLog]:
    """A Shuffle_4 student, `epochs` epochs of 10 batches of the digits (640 of the 1,200 training images each)."""
    pl.seed_everything(0)
    student = Student(small_wrn("Shuffle_4"), small_wrn(), str(checkpoint), beta=beta, optimizer=SGD)
    log = EpochLog()
    bare_trainer(epochs, callbacks=[log], limit_train_batches=10).fit(student, Digits(batch_size=64))
    return student, log


def at_total(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("train/at_g"))


@pytest.mark.slow(43)
def test_attention_transfer_loss_falls_and_the_teacher_stays_frozen(teacher_checkpoint):
    saved = torch.load(teacher_checkpoint, weights_only=True)["state_dict"]
    student, log = train_student(teacher_checkpoint, beta=1e3)
    assert len(log.epochs) == 3 and {"train/at_g1", "train/at_g2", "train/at_g3", "train/task"} <= set(log.epochs[0])
    assert at_total(log.epochs[-1]) < 0.6 * at_total(log.epochs[0])
    # frozen: weights and running statistics exactly as loaded, in eval mode, outside the optimizer
    for key, value in student.teacher.state_dict().items():
        assert torch.equal(value, saved[f"net.{key}"]), key
    assert not student.teacher.training and all(not p.requires_grad for p in student.teacher.parameters())
    _, plain = train_student(teacher_checkpoint, beta=0.0)  # the same student without the AT term
    assert at_total(log.epochs[-1]) < 0.5 * at_total(plain.epochs[-1])


@pytest.mark.slow(19)
def test_student_checkpoints_leave_the_teacher_out_and_resume(teacher_checkpoint, tmp_path):
    pl.seed_everything(0)
    student = Student(small_wrn("Generic_0.5"), small_wrn(), str(teacher_checkpoint), optimizer=SGD)
    trainer = bare_trainer(1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(student, Digits(batch_size=32))
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    state = torch.load(tmp_path / "student.ckpt", weights_only=True)["state_dict"]
    assert state and not any(k.startswith("teacher.") for k in state)
    resumed = Student(small_wrn("Generic_0.5"), small_wrn(), str(teacher_checkpoint), optimizer=SGD)
    again = bare_trainer(2, limit_train_batches=2, limit_val_batches=1)
    again.fit(resumed, Digits(batch_size=32), ckpt_path=tmp_path / "student.ckpt")
    assert again.current_epoch == 2 and again.global_step == 4


@pytest.mark.parametrize(
    "write, message",
    [
        (None, "not found: train the teacher first"),
        (lambda p: p.write_bytes(b"not a checkpoint"), "not a PyTorch checkpoint"),
        (lambda p: torch.save({"state_dict": {"net.stem.weight": torch.zeros(1)}}, p), "does not fit"),
        (lambda p: torch.save({"state_dict": Path("x")}, p), "holds Python objects"),  # needs unpickling
    ],
    ids=["missing", "corrupt", "wrong-net", "pickled-object"],
)
def test_bad_teacher_checkpoints_are_one_clear_error(write, message, tmp_path):
    path = tmp_path / "teacher.ckpt"
    if write is not None:
        write(path)
    student = Student(small_wrn("Sep"), small_wrn(), str(path))
    with pytest.raises(ConfigError, match=message) as error:
        student.setup("fit")
    assert "weights_only" not in str(error.value)  # never advice to unpickle
    with pytest.raises(ConfigError, match="teacher_checkpoint"):
        Student(small_wrn("Sep"), small_wrn()).setup("fit")
    with pytest.raises(ConfigError, match="kd_alpha"):
        Student(small_wrn("Sep"), small_wrn(), str(path), kd_alpha=2.0).setup("fit")


def test_a_students_loss_is_task_plus_beta_times_the_summed_at_losses(teacher_checkpoint):
    torch.manual_seed(0)
    student = Student(small_wrn("Sep"), small_wrn(), str(teacher_checkpoint), beta=10.0, kd_alpha=0.25)
    student.setup("validate")
    student.eval()  # batch norm on running statistics: the same forward twice
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    loss = student.step((x, y), "val")
    with torch.no_grad():  # by hand
        logits, teacher_logits = student.net(x), student.teacher(x)
        transfer = student.attention.losses()
        task = 0.75 * F.cross_entropy(logits, y) + 0.25 * distillation_loss(logits, teacher_logits, 4.0)
    assert len(transfer) == 3 and all(v > 0 for v in transfer.values())
    assert loss.item() == pytest.approx((task + 10.0 * sum(transfer.values())).item(), rel=1e-5)
    assert student.val_metrics["task"].compute().item() == pytest.approx(task.item(), rel=1e-5)


@pytest.mark.parametrize(
    "student, teacher", [("mnist_student.yaml", "mnist_teacher.yaml"), ("students/shuffle4.yaml", "wrn28_10.yaml")]
)
def test_a_missing_teacher_names_the_config_that_trains_it(student, teacher, monkeypatch):
    """The MNIST student's teacher is mnist_teacher.yaml, not the CIFAR-10 WRN-28-10 (the old message's)."""
    monkeypatch.chdir(ROOT)
    config = yaml.safe_load((CONFIGS / "compression" / student).read_text())
    hint = teacher_hint(Path(config["model"]["init_args"]["teacher_checkpoint"]))
    assert hint.startswith(f"train the teacher first (python train.py fit --config configs/compression/{teacher})")
