"""Google Speech Commands (v0.01 or v0.02) as 1x32x32 log-mel images, computed per batch on the device.

Reads the dataset's own folder layout: one folder per word of 16 kHz mono 16-bit wav files,
`validation_list.txt` and `testing_list.txt` (the official split; training is every other clip) and
`_background_noise_/`. Classes are [unknown, silence, *words] (the paper's order): `unknown` is any
other word, `silence` is added as `silence_fraction` of each split, as all-zero clips (the paper)
or 1 s crops of the background noise at a random volume (the common keyword-spotting set).

The wav files are decoded once into one int16 tensor and cached beside the data
(`<data_dir>/.netlab-cache/`, keyed by the settings and the file list, rebuilt when either
changes, written atomically); later runs start from the cache in seconds. At setup each clip's
STFT is summarised once, on the training device, into its mel moments; a batch's features and
training augmentations are computed from them (`datamodules.audio_features`), and only the clips
whose speed an augmentation changes need a new STFT.
"""

from __future__ import annotations

import hashlib
import json
import os
import wave
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from datamodules.audio_features import AudioAugment, LogMel
from datamodules.tensor_data import (
    CorruptDataError,
    DataNotFoundError,
    ShardedOrder,
    Split,
    TensorDataModule,
    TensorLoader,
)
from lightning_modules.errors import require

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SAMPLE_RATE = 16000
BACKGROUND = "_background_noise_"
CACHE_VERSION = 1


def read_wav(path: Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A mono 16-bit PCM wav file as int16 samples; a corrupt, truncated or other-format file is one clear error."""
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate, frames = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            data = f.readframes(frames)
    except (wave.Error, EOFError, OSError) as e:
        raise CorruptDataError(f"{path}: not a readable wav file ({e})") from e
    if rate != sample_rate:
        raise CorruptDataError(f"{path}: sample rate {rate} Hz, expected {sample_rate} Hz")
    if channels != 1 or width != 2:
        raise CorruptDataError(f"{path}: {channels} channel(s) of {8 * width}-bit samples, expected mono 16-bit PCM")
    if len(data) != frames * width:
        raise CorruptDataError(f"{path}: truncated ({len(data)} of {frames * width} bytes of samples)")
    return np.frombuffer(data, dtype="<i2")


def fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    """Pad with zeros or trim to `length` samples (1 s)."""
    if len(samples) >= length:
        return samples[:length]
    return np.pad(samples, (0, length - len(samples)))


class WaveformLoader(TensorLoader):
    """Batches of int16 clips -> (log-mel images, labels), from the clips' precomputed mel moments; noise
    (the paper's noise test) goes into the waveform, so a noisy batch is featurised afresh."""

    def __init__(
        self,
        split: Split,
        moments: torch.Tensor,
        batch_size: int,
        sampler: ShardedOrder,
        features: LogMel,
        augment: AudioAugment | None = None,
        noise: float = 0.0,
        noise_seed: int = 0,
    ):
        super().__init__(
            split, batch_size, (0.0,), (1.0,), sampler, augment=augment, noise=noise, noise_seed=noise_seed
        )
        self.moments, self.features = moments, features

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self.split.labels.index_select(0, index)
        if self.noise:  # (1 - a) x + a U(-1, 1), on the waveform, unclipped
            x = self.split.images.index_select(0, index).float() / 32768.0
            noise = torch.rand(x.shape, generator=self.generator, device=x.device) * 2 - 1
            return self.features((1 - self.noise) * x + self.noise * noise), labels
        moments = self.moments.index_select(0, index)
        if self.augment is None:
            return self.features.to_db(moments[:, 0]), labels
        x = self.split.images.index_select(0, index).float() / 32768.0
        return self.augment(x, self.features, moments), labels


class BalancedOrder(ShardedOrder):
    """Each epoch draws `size` samples with replacement, every class equally likely (the paper's sampler)."""

    def __init__(self, labels: torch.Tensor, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(len(labels), shuffle=True, seed=seed, rank=rank, world_size=world_size, pad=True)
        counts = torch.bincount(labels.cpu())
        self.weights = (1.0 / counts.clamp(min=1).double())[labels.cpu()]

    def indices(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        total = len(self) * self.world_size
        order = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        return order[self.rank :: self.world_size]


class SpeechCommands(TensorDataModule):
    """Speech Commands keyword spotting: 12 classes by default ([unknown, silence] + the ten digits)."""

    mean, std = (0.0,), (1.0,)

    def __init__(
        self,
        data_dir: str = "data/speech_commands",
        words: tuple[str, ...] = DIGITS,
        silence: Literal["zeros", "background"] = "zeros",
        silence_fraction: float = 0.1,
        balanced: bool = True,
        augment: bool = True,
        batch_size: int = 16,
        eval_batch_size: int = 256,
        first_epoch_batch_size: int | None = None,
        seed: int = 0,
        on_device: bool = True,
        cache: bool = True,
    ):
        """
        Args:
            data_dir: the unpacked dataset: one folder per word, validation_list.txt, testing_list.txt,
                _background_noise_/.
            words: the words to tell apart; every other word is `unknown` (the paper: the ten digits).
            silence: `zeros` (the paper: all-zero clips) or `background` (1 s crops of _background_noise_
                at a random volume, the common keyword-spotting set).
            silence_fraction: silence clips added to each split, as a fraction of its size.
            balanced: draw training samples with every class equally likely (the paper's sampler).
            augment: the spec's training augmentations (amplitude, speed, stretch, shift).
            batch_size: training samples per batch, per device.
            eval_batch_size: validation and test samples per batch, per device.
            first_epoch_batch_size: a different training batch size for the first epoch only.
            seed: seed of the silence clips (and of their volumes).
            on_device: keep the clips on the training device (GPU) instead of host memory.
            cache: keep the decoded clips in `<data_dir>/.netlab-cache/` for the next run.
        """
        super().__init__(batch_size, 1, seed, on_device, first_epoch_batch_size)
        require("positive", eval_batch_size=eval_batch_size)
        require("fraction", silence_fraction=silence_fraction)
        if silence not in ("zeros", "background"):
            raise ValueError(f"silence must be 'zeros' or 'background', got {silence!r}")
        self.data_dir, self.words = Path(data_dir), tuple(words)
        self.silence, self.silence_fraction, self.balanced = silence, silence_fraction, balanced
        self.eval_batch_size, self.cache = eval_batch_size, cache
        self.classes = ("unknown", "silence", *self.words)
        self.num_classes = len(self.classes)
        self.input_shape = (1, 32, 32)
        self.features = LogMel(SAMPLE_RATE)
        self.augmentation = AudioAugment() if augment else None
        self.moments: dict[str, torch.Tensor] = {}

    # --- reading the folder -------------------------------------------------------------------------

    def _require(self, path: Path, what: str) -> Path:
        if not path.exists():
            raise DataNotFoundError(
                f"Speech Commands {what} not found: {path}. Put the unpacked speech_commands_v0.01 or v0.02 folder "
                f"at {self.data_dir}/ (one folder per word of 16 kHz wav files, validation_list.txt, "
                "testing_list.txt, _background_noise_/), or set --data.data_dir"
            )
        return path

    def clip_files(self) -> dict[str, list[str]]:
        """Relative paths (word/file.wav) of every clip, per official split, sorted."""
        self._require(self.data_dir, "folder")
        lists = {}
        for split, name in (("val", "validation_list.txt"), ("test", "testing_list.txt")):
            lines = self._require(self.data_dir / name, "split list").read_text().split()
            lists[split] = {line.strip() for line in lines if line.strip()}
        folders = sorted(p.name for p in self.data_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
        for word in self.words:
            if word not in folders:
                self._require(self.data_dir / word, f"folder of the word {word!r}")
        every = sorted(
            f"{folder}/{f.name}"
            for folder in folders
            for f in os.scandir(self.data_dir / folder)
            if f.name.endswith(".wav")
        )
        held_out = lists["val"] | lists["test"]
        return {
            "train": [f for f in every if f not in held_out],
            "val": [f for f in every if f in lists["val"]],
            "test": [f for f in every if f in lists["test"]],
        }

    def cache_key(self, files: dict[str, list[str]]) -> str:
        """A hash of the settings that shape the clips and of every file's name, size and modification time."""
        digest = hashlib.sha256()
        settings = [CACHE_VERSION, self.words, self.silence, self.silence_fraction, self.seed]
        digest.update(json.dumps(settings).encode())
        for name in sorted(set(sum(files.values(), [])) | {"validation_list.txt", "testing_list.txt"}):
            stat = (self.data_dir / name).stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        if self.silence == "background":
            for path in sorted(self._require(self.data_dir / BACKGROUND, "background noise folder").glob("*.wav")):
                digest.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns};".encode())
        return digest.hexdigest()[:16]

    def label_of(self, relative: str) -> int:
        word = relative.split("/", 1)[0]
        return self.classes.index(word) if word in self.words else 0

    def silence_clips(self, count: int, generator: np.random.Generator) -> np.ndarray:
        """`count` silence clips: zeros, or random 1 s crops of the background noise at volume U(0, 1)."""
        clips = np.zeros((count, SAMPLE_RATE), dtype=np.int16)
        if self.silence == "zeros" or count == 0:
            return clips
        noises = [read_wav(p) for p in sorted((self.data_dir / BACKGROUND).glob("*.wav"))]
        noises = [n for n in noises if len(n) >= SAMPLE_RATE]
        if not noises:
            raise DataNotFoundError(f"{self.data_dir / BACKGROUND}: no wav file of at least 1 s to cut silence from")
        for i in range(count):
            noise = noises[generator.integers(len(noises))]
            start = generator.integers(len(noise) - SAMPLE_RATE + 1)
            clips[i] = (noise[start : start + SAMPLE_RATE] * generator.uniform(0, 1)).astype(np.int16)
        return clips

    def decode(self, files: dict[str, list[str]]) -> dict[str, Split]:
        """Decode every clip (1 s, int16) and add the silence clips, per split."""
        from tqdm import tqdm

        total = sum(len(v) for v in files.values())
        generator = np.random.default_rng(self.seed)
        splits = {}
        with tqdm(total=total, desc=f"decoding Speech Commands ({total} clips, once)", unit="clip") as bar:
            for split, names in files.items():
                clips = np.zeros((len(names), SAMPLE_RATE), dtype=np.int16)
                for i, name in enumerate(names):
                    clips[i] = fit_length(read_wav(self.data_dir / name), SAMPLE_RATE)
                    bar.update()
                silence = self.silence_clips(round(self.silence_fraction * len(names)), generator)
                labels = [self.label_of(n) for n in names] + [1] * len(silence)
                waves = torch.from_numpy(np.concatenate([clips, silence]))
                splits[split] = Split(waves, torch.tensor(labels, dtype=torch.long))
        return splits

    def make_splits(self) -> dict[str, Split]:
        """The official splits, decoded, from the cache when it matches the settings and the files."""
        files = self.clip_files()
        path = self.data_dir / ".netlab-cache" / f"speech-{self.cache_key(files)}.pt"
        if self.cache and path.is_file():
            try:
                stored = torch.load(path, weights_only=True)
                return {name: Split(*stored[name]) for name in ("train", "val", "test")}
            except Exception:  # an unreadable cache is rebuilt, never trusted
                pass
        splits = self.decode(files)
        if self.cache:
            path.parent.mkdir(exist_ok=True)
            temporary = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({name: (s.images, s.labels) for name, s in splits.items()}, temporary)
            os.replace(temporary, path)  # atomic: a killed run never leaves half a cache
        return splits

    # --- the datamodule -----------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        device = self.splits["train"].images.device
        if self.moments and next(iter(self.moments.values())).device == device:
            return
        # the first pass: each clip's mel moments, once per run, on the training device (training needs both
        # for the augmentations, evaluation only the mel power)
        self.moments = {}
        with torch.no_grad():
            for name, split in self.splits.items():
                parts = [
                    self.features.moments(split.images[i : i + 512].float() / 32768.0)[:, : 2 if name == "train" else 1]
                    for i in range(0, len(split), 512)
                ]
                self.moments[name] = torch.cat(parts)

    def _sampler(self, name: str, train: bool) -> ShardedOrder:
        if not (train and self.balanced):
            return super()._sampler(name, train)
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return BalancedOrder(self.splits[name].labels, self.shuffle_seed, rank, world)

    def _loader(self, name: str, train: bool, noise: float = 0.0, noise_seed: int = 0) -> WaveformLoader:
        return WaveformLoader(
            self.split(name),
            self.moments[name],
            self.train_batch_size() if train else self.eval_batch_size,
            self._sampler(name, train),
            self.features,
            augment=self.augmentation if train else None,
            noise=noise,
            noise_seed=noise_seed,
        )
