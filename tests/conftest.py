"""Shared test helpers: tiny datasets in the real on-disk formats, and running the CLI in-process."""

from __future__ import annotations

import gzip
import os
import pickle
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from datamodules.tensor_data import Split, TensorDataModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHARED_MNIST = ROOT.parent / "shared" / "datasets" / "mnist-10k"

os.environ.setdefault("WANDB_MODE", "offline")  # no test may reach a network
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one core per worker: 2 workers x 2 threads thrash a 2-core machine
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the train.py processes a test starts
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def own_wandb_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """The processes a test starts get their own W&B service, as from a user's shell: W&B points its children at
    this process's service (WANDB_SERVICE), which would keep a killed child's run "in use"."""
    monkeypatch.delenv("WANDB_SERVICE", raising=False)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts: this one's, with the project importable and without
    WANDB_SERVICE, which W&B leaves pointing at this process's service, closed or not (a module-scoped fixture
    starts processes before `own_wandb_service` runs)."""
    return {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "PYTHONPATH": str(ROOT), **extra}


@pytest.fixture(autouse=True)
def no_wandb_run_left_open():
    """Close a W&B run a test leaves open in this process (an in-process `cli(...)` that failed), so the next test in
    the same worker starts as a fresh process would, with no run but its own."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def expected_seconds(item: pytest.Item) -> float:
    """How long a test is expected to take: its `slow` marker's seconds (`@pytest.mark.slow(52)`), 1 for a slow test
    without them, 0 for the rest."""
    marker = item.get_closest_marker("slow")
    return 0.0 if marker is None else float(marker.args[0]) if marker.args else 1.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests first, dealt among the parallel workers, so that each starts on its share of them and the
    short ones fill in around them at the end, instead of one worker finishing a minute-long test alone (a stable
    sort: equal tests keep their files' order)."""
    items.sort(key=expected_seconds, reverse=True)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        items[:] = dealt(items, workers)


def dealt(items: list[pytest.Item], workers: int) -> list[pytest.Item]:
    """The items, longest first, as `workers` runs of the lengths pytest-xdist's first split sends (worker i the
    next len(rest) // (workers - i) tests), each dealt to the run expected to take least time so far."""
    sizes, rest = [], len(items)
    for i in range(workers):
        sizes.append(rest // (workers - i))
        rest -= sizes[-1]
    hands: list[list[pytest.Item]] = [[] for _ in sizes]
    loads = [0.0] * workers
    for item in items:
        hand = min((h for h in range(workers) if len(hands[h]) < sizes[h]), key=lambda h: (loads[h], len(hands[h])))
        hands[hand].append(item)
        loads[hand] += expected_seconds(item)
    return [item for hand in hands for item in hand]


def free_port() -> int:
    """A TCP port free on this machine now, for the rendezvous of DDP ranks a test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank(rank: int, fn, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank))  # fmt: skip
    try:
        fn(rank, *args)
    finally:  # as train.py does: a gloo group left to interpreter shutdown aborts a rank now and then (SIGABRT)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# what the server of the ranks' processes imports once per test worker: a rank forked from it starts at once,
# where a spawned one imports torch, Lightning and the project again (about 6 s of CPU on this machine)
RANK_PRELOAD = ["torch", "pytorch_lightning", "lightning_modules", "callbacks", "datamodules", "tests.conftest"]


def preload_forkserver() -> None:
    """Have this process's `forkserver` (started at its first use) import RANK_PRELOAD."""
    import multiprocessing

    multiprocessing.get_context("forkserver").set_forkserver_preload(RANK_PRELOAD)


def start_ranks(fn, args: tuple, nprocs: int = 2, join: bool = True):
    """`fn(rank, *args)` in `nprocs` fresh processes, as `torch.multiprocessing.spawn` starts them (pickled `fn`,
    nothing shared), but forked from a server that has imported the project already (`forkserver`)."""
    import torch.multiprocessing as mp

    preload_forkserver()
    return mp.start_processes(fn, args=args, nprocs=nprocs, join=join, start_method="forkserver")


def ddp_from_forkserver():
    """Lightning's DDP with its ranks started as `ddp_spawn` starts them (in-process, the trainer pickled), but forked
    from the server that `start_ranks` uses."""
    from pytorch_lightning.strategies import DDPStrategy

    preload_forkserver()
    return DDPStrategy(start_method="forkserver")


def two_ranks(fn, *args, timeout: float = 120) -> None:
    """`fn(rank, *args)` as 2 DDP ranks (processes started by `start_ranks`, their rendezvous on a free port, for a
    Trainer with strategy ddp on 2 CPU devices); ranks that do not finish in `timeout` are killed and fail the test:
    a hang (one rank waits in a collective the other skipped)."""
    ranks = start_ranks(_rank, (fn, free_port(), args), join=False)
    deadline = time.monotonic() + timeout
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"2 DDP ranks did not finish in {timeout:g} s: a rank skipped a collective the other waits in")


def _gloo_rank(rank: int, fn, folder: str, args: tuple) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        torch.save(fn(rank, *args), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def on_two_gloo_ranks(fn, folder: Path, *args) -> list:
    """What `fn(rank, *args)` returns on each of 2 processes joined in a gloo process group (no Trainer), in rank
    order; `fn` must be a module-level function (it is pickled) and return what `torch.load(weights_only=True)`
    reads."""
    start_ranks(_gloo_rank, (fn, str(folder), args))
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(2)]


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Write `array` in the IDX format of the MNIST files (uint8 data, big-endian dims)."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_mnist(root: Path, n_train: int = 96, n_test: int = 48, folder: str = "MNIST", seed: int = 0) -> Path:
    """A tiny MNIST in torchvision's layout (<root>/<folder>/raw/*-ubyte.gz): label-dependent blobs, learnable."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):  # a bright square whose place encodes the label
            r, c = 2 + 8 * (label // 4), 2 + 8 * (label % 4)
            images[i, r : r + 6, c : c + 6] = 255
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    return make_mnist(tmp_path / "data")


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder, so runs/ and wandb/ land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(*args: str):
    """Run `python train.py ARGS` in this process and return the CLI object."""
    from lightning_modules.run.cli import ResearchCLI

    return ResearchCLI(args=[str(a) for a in args])


QUIET = ["--wandb", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def make_cifar10(root: Path, per_batch: int = 20, n_test: int = 40, seed: int = 0) -> Path:
    """A tiny CIFAR-10 in the official python format (<root>/cifar-10-batches-py/, pickled dicts, bytes keys)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 3, 32, 32)).astype(np.uint8)
        for i, label in enumerate(labels):  # a bright square whose place encodes the label
            r, c = 3 + 7 * (label // 4), 3 + 7 * (label % 4)
            images[i, label % 3, r : r + 6, c : c + 6] = 255
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in labels],
            b"data": images.reshape(n, 3072),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return root


@pytest.fixture
def tiny_cifar10(tmp_path: Path) -> Path:
    return make_cifar10(tmp_path / "data")


class TinyImages(TensorDataModule):
    """Given uint8 images as the official test split (and a copy as the training pool), through the real
    in-memory machinery; normalised as x / 255, so a test knows every activation exactly."""

    mean, std, num_classes = (0.0,), (1.0,), 10

    def __init__(self, images: torch.Tensor, batch_size: int = 4):
        super().__init__(batch_size=batch_size, val_size=len(images) - 1)
        self.images = images
        self.input_shape = tuple(images.shape[1:])

    def load(self) -> tuple[Split, Split]:
        labels = torch.arange(len(self.images)) % 10
        return Split(self.images.clone(), labels), Split(self.images, labels)


def make_image_folder(root: Path, classes: int = 2, train: int = 4, val: int = 2, size: int = 40) -> Path:
    """A tiny dataset in ImageFolder layout (root/train/<class>/*.JPEG, root/val/...), JPEG files like ImageNet's."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i}.JPEG", format="JPEG")
    return root


def write_wav(path: Path, samples: np.ndarray, sample_rate: int = 16000) -> Path:
    """A mono 16-bit PCM wav file, the format of the Speech Commands clips."""
    import wave

    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(np.asarray(samples, dtype="<i2").tobytes())
    return path


SPEECH_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "bed", "cat")


def tone(frequency: float, length: int = 16000, seed: int = 0) -> np.ndarray:
    """A tone with a little noise, as int16 samples."""
    rng = np.random.default_rng(seed)
    t = np.arange(length) / 16000
    wave_ = 0.5 * np.sin(2 * np.pi * frequency * t) + 0.05 * rng.standard_normal(length)
    return (np.clip(wave_, -1, 1) * 32767).astype(np.int16)


def make_speech_commands(root: Path, clips: int = 4, words: tuple[str, ...] = SPEECH_WORDS) -> Path:
    """A tiny Speech Commands folder in the real layout: one folder per word of 16 kHz wav files (a tone whose
    pitch encodes the word; some clips shorter than 1 s), the two split lists, and _background_noise_."""
    val, test = [], []
    for w, word in enumerate(words):
        for i in range(clips):
            name = f"{word}/{i:08x}_nohash_0.wav"
            length = 16000 if i % 2 == 0 else 12000
            write_wav(root / name, tone(200 + 150 * w, length, seed=w * 100 + i))
            (val if i == 1 else test if i == 2 else []).append(name)
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    rng = np.random.default_rng(0)
    write_wav(root / "_background_noise_" / "white_noise.wav", (rng.standard_normal(40000) * 3000).astype(np.int16))
    return root


def data_args(config: Path, root: Path) -> list[str]:
    """Tiny files in the real format of the config's dataset, and the arguments that point at them."""
    return data_args_of(yaml.safe_load(config.read_text()).get("data", {}), root)


def data_args_of(data: dict, root: Path, prefix: str = "--data.") -> list[str]:
    """`data_args` for a config's `data:` section (a task stream's: its own data's, under its `data` argument)."""
    data_class = data.get("class_path", "")
    init_args = data.get("init_args") or {}
    args: list[str]
    if data_class.endswith("TaskStream"):
        # random labels on a subset the tiny training split holds
        subset = [f"{prefix}init_args.random_label_samples", "16"] if "random_label_samples" in init_args else []
        return [*data_args_of(init_args["data"], root, f"{prefix}init_args.data.init_args."), *subset]
    if "MNIST" in data_class:
        make_mnist(root)
        args = [*small_splits(root), "--data.test_size", "8"] if init_args.get("test_size") else small_splits(root)
    elif "CIFAR10" in data_class:
        make_cifar10(root)
        args = small_splits(root)
    elif "SpeechCommands" in data_class:
        make_speech_commands(root / "speech")
        args = ["--data.data_dir", str(root / "speech")]
    elif "ImageFolder" in data_class:
        make_image_folder(root)
        args = ["--data.data_dir", str(root), "--data.image_size", "32", "--data.num_workers", "0"]
    else:
        args = []
    return [a.replace("--data.", prefix, 1) if str(a).startswith("--data.") else a for a in args]


def small_net_args(config: Path) -> list[str]:
    """For a config of a full-size Wide-ResNet (36M or 69M parameters, a GPU job): the same net at its smallest, so
    the config's fit runs in a second. Students are shrunk by `teacher_args`."""
    model = yaml.safe_load(config.read_text()).get("model", {})
    net = (model.get("init_args") or {}).get("net") or {}
    kind = net.get("class_path", "") if isinstance(net, dict) else ""
    if "Student" in model.get("class_path", "") or not kind.endswith(("WideResNet", "WideResNetImageNet")):
        return []
    small = {"depth": 10, "width": 1} if kind.endswith("WideResNet") else {"width": 1}
    return [arg for key, value in small.items() for arg in (f"--model.init_args.net.init_args.{key}", str(value))]


def small_splits(root: Path) -> list[str]:
    """The arguments that point an MNIST or CIFAR-10 config at tiny files, with a validation split they can hold."""
    return ["--data.data_dir", str(root), "--data.download", "false", "--data.val_size", "16"]


def teacher_args(config: Path, root: Path) -> list[str]:
    """For a student's config: student and teacher shrunk to WRN-10-1 (the full-size run is a GPU job), and
    that teacher, freshly initialised, saved as a checkpoint of this framework."""
    from lightning_modules.nets import WideResNet

    model = yaml.safe_load(config.read_text())["model"]
    if "Student" not in model["class_path"]:
        return []
    small = {"depth": 10, "width": 1}
    teacher = WideResNet(**{**model["init_args"]["teacher"]["init_args"], **small})
    root.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"net.{k}": v for k, v in teacher.state_dict().items()}}, root / "teacher.ckpt")
    shrink = [
        [f"--model.init_args.{net}.init_args.{k}", str(v)] for net in ("net", "teacher") for k, v in small.items()
    ]
    return [*sum(shrink, []), "--model.init_args.teacher_checkpoint", str(root / "teacher.ckpt")]


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


class TrainProcess:
    """`python train.py ARGS` started as its own process group (`launcher`: e.g. TORCHRUN in front), for what only
    a process shows: exit codes, DDP, kills. `result()` waits for it; one that does not end in time is a hang,
    killed with every process it started, and fails the test saying so."""

    def __init__(self, *args, cwd: Path, env: dict | None = None, launcher: tuple[str, ...] = (sys.executable,)):
        self.command = [*launcher, str(ROOT / "train.py"), *map(str, args)]
        environment = child_env(**(env or {}))
        self.process = subprocess.Popen(
            self.command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,  # its own group: a hung DDP run's ranks are killed with it
        )  # fmt: skip

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess:
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.process.communicate()
        else:
            return subprocess.CompletedProcess(self.command, self.process.returncode, out, err)
        command = " ".join(self.command[self.command.index(str(ROOT / "train.py")) :])
        last = "\n".join((out + err).splitlines()[-15:])
        pytest.fail(
            f"{command} did not finish in {timeout:g} s: it hangs (under DDP: a collective that one rank makes and the "
            f"others never do). Its last lines:\n{last}",
            pytrace=False,
        )

    def kill(self) -> None:
        """End it and every process it started (a DDP run's ranks), if it still runs."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, 9)


@pytest.fixture
def launch():
    """Start `train.py` processes (TrainProcess's arguments); any still running when the test ends is killed."""
    started: list[TrainProcess] = []

    def start(*args, **kwargs) -> TrainProcess:
        started.append(TrainProcess(*args, **kwargs))
        return started[-1]

    yield start
    for process in started:
        process.kill()


def run_train(*args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python train.py ARGS` as its own process, waited for (see TrainProcess)."""
    process = TrainProcess(*args, cwd=cwd, env=env)
    try:
        return process.result(timeout)
    finally:
        process.kill()


def fit_quickstart(*extra: str):
    return cli(
        "fit",
        "--config",
        CONFIGS / "quickstart.yaml",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "4",
        "--trainer.limit_val_batches",
        "2",
        *QUIET,
        *extra,
    ).trainer


def cli_error(*args: str, capsys) -> str:
    """The error a user sees from `train.py ARGS` (run in-process): what stderr or the exit message says."""
    from lightning_modules.run.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    code = exit_info.value.code
    if isinstance(code, str):
        return code
    err = capsys.readouterr().err
    return err[err.index("error:") :]  # after Lightning's warning that args= came from inside Python


def probe_images() -> torch.Tensor:
    """Ten 1x4x4 images with pixels in [0, 200]; one pixel of the last image is 255."""
    images = torch.randint(0, 201, (10, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images[9, 0, 2, 3] = 255
    return images


def probe_net() -> nn.Module:
    """Conv units: 0 alive, 1 and 2 dead, 3 alive only at the 255 pixel. Hidden units: 0 alive, 1 dead,
    2 alive only for the last image. Both activations in place."""
    conv = nn.Conv2d(1, 4, 1)
    hidden = nn.Linear(4, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0, 1.0, 1.0]).view(4, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, 0.0, -2.0, -0.9]))
        hidden.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 1.0]]))
        hidden.bias.zero_()
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(OrderedDict(conv=conv, act=nn.ReLU(inplace=True))),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            hidden=nn.Sequential(OrderedDict(linear=hidden, act=nn.ReLU(inplace=True))),
            head=nn.Linear(3, 10),
        )
    )
