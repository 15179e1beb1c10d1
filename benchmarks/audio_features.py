"""Speech Commands features with training augmentation: the framework's batched torch path against a per-clip
librosa loop like the original's transforms.

Both compute, for every 1 s clip at 16 kHz, the spec's pipeline with each augmentation applied with
probability 0.5: amplitude x U(0.7, 1.1), speed change +-20%, |STFT| (n_fft 2048, hop 512), time stretch
+-20% (phase vocoder), time shift +-8 frames, a 32-band mel power spectrogram in dB relative to the clip's
max. The framework does it on a batch of clips at once (`datamodules.audio_features`), on the GPU when
there is one; the loop does it clip by clip with numpy and librosa, as the original's Dataset did per sample.
The framework summarises each clip once per run (its mel moments, the first pass); an epoch then
computes augmented features from them and takes a new STFT only of the clips whose speed changes.
Reported: seconds of audio featurised per second, best of `--rounds` rounds, the paths round-robin.

    python benchmarks/audio_features.py [--clips 512 --batch 256 --rounds 3]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.audio_features import AudioAugment, LogMel  # noqa: E402

RATE, N_FFT, HOP, N_MELS = 16000, 2048, 512, 32


def librosa_clip(samples: np.ndarray, mel_basis: np.ndarray) -> np.ndarray:
    """One clip through the original's transforms, each with probability 0.5."""
    import librosa

    if random.random() < 0.5:
        samples = samples * random.uniform(0.7, 1.1)
    if random.random() < 0.5:
        speed = 1.0 / (1 + random.uniform(-0.2, 0.2))
        index = np.round(np.arange(0, len(samples), speed))
        samples = np.interp(index, np.arange(len(samples)), samples)
    samples = np.pad(samples, (0, max(0, RATE - len(samples))))[:RATE]
    stft = librosa.stft(samples, n_fft=N_FFT, hop_length=HOP)
    frames = stft.shape[1]
    if random.random() < 0.5:
        stft = librosa.phase_vocoder(stft, rate=1 + random.uniform(-0.2, 0.2), hop_length=HOP)
    if random.random() < 0.5:
        shift = random.randint(-8, 8)
        a, b = -min(0, shift), max(0, shift)
        stft = np.pad(stft, ((0, 0), (a, b)))
        stft = stft[:, : stft.shape[1] - a] if a else stft[:, b:]
    stft = np.pad(stft, ((0, 0), (0, max(0, frames - stft.shape[1]))))[:, :frames]
    mel = mel_basis @ np.abs(stft) ** 2
    return librosa.power_to_db(mel, ref=np.max)


def time_librosa(clips: np.ndarray) -> float:
    import librosa

    mel_basis = librosa.filters.mel(sr=RATE, n_fft=N_FFT, n_mels=N_MELS)
    start = time.perf_counter()
    for clip in clips:
        librosa_clip(clip, mel_basis)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_framework(clips: torch.Tensor, batch: int, device: torch.device) -> tuple[float, float]:
    """(first pass: every clip's mel moments, once per run; an epoch of augmented features from them)."""
    features, augment = LogMel(RATE), AudioAugment()
    clips = clips.to(device)
    features(clips[:batch], augment)  # warm-up: window and filter bank on the device
    sync(device)
    start = time.perf_counter()
    moments = torch.cat([features.moments(clips[b : b + batch]) for b in range(0, len(clips), batch)])
    sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for b in range(0, len(clips), batch):
        augment(clips[b : b + batch], features, moments[b : b + batch])
    sync(device)
    return first, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    t = np.arange(RATE) / RATE
    clips = np.stack(
        [
            0.5 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.05 * rng.standard_normal(RATE)
            for _ in range(args.clips)
        ]
    )
    clips = clips.astype(np.float32)
    time_librosa(clips[:8])  # warm-up: librosa's first call compiles with numba
    names = ("librosa loop, every epoch", "framework, first pass (moments, once per run)", "framework, an epoch")
    best = dict.fromkeys(names, float("inf"))
    for _ in range(args.rounds):  # round-robin, so a slow moment of a shared machine hits both
        best[names[0]] = min(best[names[0]], time_librosa(clips))
        first, epoch = time_framework(torch.from_numpy(clips), args.batch, device)
        best[names[1]], best[names[2]] = min(best[names[1]], first), min(best[names[2]], epoch)
    print(f"{args.clips} clips of 1 s, batch {args.batch}, {device.type}, torch {torch.get_num_threads()} threads")
    print(f"| path | best of {args.rounds} (s) | s of audio per s | vs the loop |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.3f} | {args.clips / seconds:,.0f} | {best[names[0]] / seconds:.1f}x |")


if __name__ == "__main__":
    main()
