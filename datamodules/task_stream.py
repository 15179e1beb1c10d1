"""A stream of T tasks of one in-memory dataset (spec 07, loss of plasticity): permuted inputs, permuted labels or
random labels, switching every `steps_per_task` training batches.

Task t is drawn from a generator seeded by (seed, t) alone, so it is the same in every run, on every DDP rank and
for every intervention compared. The transforms act on the batches on the device (a pixel permutation is one
gather, a label permutation one lookup), with no per-sample work; the stream's position is the training loader's
own batch count, so a prefetching trainer, a resumed run and every rank agree on the task of each batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from datamodules.tensor_data import ShardedOrder, Split, TensorDataModule, TensorLoader
from lightning_modules.errors import ConfigError, require

TaskKind = Literal["permuted_inputs", "permuted_labels", "random_labels"]
KINDS = ("permuted_inputs", "permuted_labels", "random_labels")


@dataclass(frozen=True)
class Tasks:
    """The stream's task transforms: task t of `kind` from a generator seeded by (seed, t)."""

    kind: str
    count: int
    seed: int = 0
    identity_first: bool = True  # permuted inputs or labels: task 0 is the data as it is

    def generator(self, task: int) -> torch.Generator:
        """Task `task`'s own generator: (seed, task) in one 64-bit seed, the same wherever it is drawn."""
        return torch.Generator().manual_seed((self.seed << 24) + task)

    def pixel_order(self, task: int, pixels: int) -> torch.Tensor | None:
        """pi_t, the positions task `task` reads each pixel from (None: unpermuted)."""
        if self.kind != "permuted_inputs" or (task == 0 and self.identity_first):
            return None
        return torch.randperm(pixels, generator=self.generator(task))

    def class_order(self, task: int, classes: int) -> torch.Tensor | None:
        """sigma_t, each class's label in task `task` (None: unpermuted)."""
        if self.kind != "permuted_labels" or (task == 0 and self.identity_first):
            return None
        return torch.randperm(classes, generator=self.generator(task))

    def random_labels(self, task: int, samples: int, classes: int) -> torch.Tensor:
        """Task `task`'s uniformly random label of each of the fixed `samples` training images."""
        return torch.randint(0, classes, (samples,), generator=self.generator(task))


@dataclass(frozen=True)
class FixedTask:
    """The task of every batch, whatever its position: an evaluation at one task."""

    task: int

    def __call__(self, _batch: int) -> int:
        return self.task


class TaskLoader(TensorLoader):
    """A TensorLoader whose batches go through the task transform of the stream's position (`task_of(batch)`)."""

    def __init__(self, stream: TaskStream, split_name: str, task_of, **kwargs):
        super().__init__(**kwargs)
        self.stream, self.split_name, self.task_of = stream, split_name, task_of

    def __iter__(self):
        self._position = self.sampler.epoch * len(self) + getattr(self, "_resume_at", 0)
        for batch in super().__iter__():
            self._position += 1
            yield batch

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = super().batch(index)
        task = self.task_of(getattr(self, "_position", 0))
        return self.stream.transform(task, images, labels, index, self.split_name)


class TaskStream(TensorDataModule):
    """`data` (any in-memory datamodule) as a stream of `tasks` tasks of `kind`, `steps_per_task` training
    batches each. Validation and test see the task being trained (the one of the last training batch); random
    labels train on a fixed subset of `random_label_samples` training images and validate on them."""

    def __init__(
        self,
        data: TensorDataModule,
        kind: TaskKind = "permuted_inputs",
        tasks: int = 10,
        steps_per_task: int = 100,
        seed: int = 0,
        identity_first: bool = True,
        random_label_samples: int = 1000,
        batch_size: int | None = None,
    ):
        """
        Args:
            data: the base dataset, an in-memory datamodule (MNIST, Digits, ...); its batch size, splits and device.
            kind: `permuted_inputs` (a pixel permutation per task), `permuted_labels` (a class permutation per task)
                or `random_labels` (fresh random labels of a fixed training subset per task).
            tasks: T, the number of tasks.
            steps_per_task: training batches of each task.
            seed: the stream's seed: task t is drawn from (seed, t), whatever the run's seed.
            identity_first: task 0 is the unpermuted data (permuted inputs or labels).
            random_label_samples: N, the training images that get random labels.
            batch_size: samples per batch, per device (default: `data`'s).
        """
        if not isinstance(data, TensorDataModule):
            raise ConfigError(f"a task stream needs an in-memory datamodule, got {type(data).__name__}")
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        require("positive", tasks=tasks, steps_per_task=steps_per_task, random_label_samples=random_label_samples)
        batch_size = data.batch_size if batch_size is None else batch_size
        super().__init__(batch_size, data.val_size, data.seed, data.on_device, None, data.test_size)
        self.data, self.kind, self.steps_per_task = data, kind, steps_per_task
        self.tasks = Tasks(kind, tasks, seed, identity_first)
        self.random_label_samples = random_label_samples
        self.mean, self.std = data.mean, data.std
        self.num_classes, self.input_shape = data.num_classes, data.input_shape
        self._orders: dict[tuple[str, int], torch.Tensor | None] = {}

    def load(self) -> tuple[Split, Split | None]:
        return self.data.load()

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        trainer = self.trainer
        if trainer is None or stage != "fit" or trainer.fast_dev_run:  # fast_dev_run: a batch or two, no stream
            return
        total = self.tasks.count * self.steps_per_task
        if trainer.max_steps != total:
            raise ConfigError(
                f"a stream of {self.tasks.count} tasks of {self.steps_per_task} steps trains {total} steps: set "
                f"trainer.max_steps: {total} (it is {trainer.max_steps})"
            )
        if trainer.val_check_interval != self.steps_per_task or trainer.check_val_every_n_epoch is not None:
            raise ConfigError(
                f"a task stream validates at each task's end: set trainer.val_check_interval: {self.steps_per_task} "
                "and trainer.check_val_every_n_epoch: null"
            )

    def make_splits(self) -> dict[str, Split]:
        splits = self.data.make_splits()
        if self.kind == "random_labels":
            n = self.random_label_samples
            if n > len(splits["train"]):
                raise ConfigError(f"random_label_samples={n}: the training split holds {len(splits['train'])} images")
            splits["train"] = splits["train"].subset(torch.arange(n))
        return splits

    def task_at(self, batch: int) -> int:
        """The task of the stream's `batch`-th training batch (the last task goes on after the stream's end)."""
        return min(batch // self.steps_per_task, self.tasks.count - 1)

    def trained_task(self) -> int:
        """The task of the last batch trained: the one validation and test evaluate."""
        steps = self.trainer.global_step if self.trainer is not None else 0
        return self.task_at(max(steps - 1, 0))

    def evaluated_task(self, _batch: int) -> int:
        """The task an evaluation batch shows, whatever its position: the one being trained."""
        return self.trained_task()

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def no_test_split(self) -> str:
        return self.data.no_test_split()

    def _cached(self, what: str, task: int, make) -> torch.Tensor | None:
        key = (what, task)
        if key not in self._orders:
            order = make()
            device = self.splits["train"].images.device if self.splits else torch.device("cpu")
            self._orders = {k: v for k, v in self._orders.items() if k[1] == task}  # the current task's only
            self._orders[key] = order.to(device) if order is not None else None
        return self._orders[key]

    def transform(
        self, task: int, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, split: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch as task `task` shows it: its pixels permuted, its labels permuted, or its random labels."""
        if self.kind == "permuted_inputs":
            n, c, h, w = images.shape
            order = self._cached("pixels", task, lambda: self.tasks.pixel_order(task, h * w))
            if order is not None:
                images = images.flatten(2).index_select(2, order).view(n, c, h, w)
        elif self.kind == "permuted_labels":
            order = self._cached("classes", task, lambda: self.tasks.class_order(task, self.num_classes))
            if order is not None:
                labels = order[labels]
        elif split == "train":  # random labels: the fixed subset's own labels of this task
            table = self._cached(
                "labels", task, lambda: self.tasks.random_labels(task, len(self.splits["train"]), self.num_classes)
            )
            labels = table[index]
        return images, labels

    def task_dataloader(self, task: int) -> TaskLoader:
        """What a task's end is measured on, as task `task` shows it, in evaluation order on one process: the
        validation split (random labels: the labelled training subset). For a loop of its own (a seed stack)."""
        name = "train" if self.kind == "random_labels" else "val"
        split = self.split(name)
        return TaskLoader(
            self, name, FixedTask(task), split=split, batch_size=self.batch_size, mean=self.mean, std=self.std,
            sampler=ShardedOrder(len(split), shuffle=False, seed=0, pad=False),
        )  # fmt: skip

    def _loader(self, name: str, train: bool, noise: float = 0.0, noise_seed: int = 0) -> TaskLoader:
        if self.kind == "random_labels" and name != "train":
            name = "train"  # random labels are learned on the subset, and measured there
        task_of = self.task_at if train else self.evaluated_task
        return TaskLoader(
            self, "train" if self.kind == "random_labels" else name, task_of,
            split=self.split(name), batch_size=self.train_batch_size() if train else self.batch_size, mean=self.mean,
            std=self.std, sampler=self._sampler(name, train), augment=self.data.augment if train else None,
            noise=noise, noise_seed=noise_seed,
        )  # fmt: skip
