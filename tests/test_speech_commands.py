"""Speech Commands: the real folder layout read by the real loader, its cache, features against librosa, errors."""

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import DataNotFoundError, SpeechCommands
from datamodules.audio_features import AudioAugment, LogMel, change_speed, mel_filterbank, shifted_times, stretched_mel
from datamodules.speech_commands import BalancedOrder, read_wav
from lightning_modules.run.cli import main
from tests.conftest import CONFIGS, make_speech_commands, tone, write_wav

librosa = pytest.importorskip("librosa", reason="librosa is the test-only reference for the features")


@pytest.fixture
def speech(tmp_path: Path) -> Path:
    return make_speech_commands(tmp_path / "speech")


def test_reads_the_official_splits_with_unknown_and_silence(speech):
    data = SpeechCommands(str(speech), silence_fraction=0.25)
    data.setup("fit")
    assert data.classes[:2] == ("unknown", "silence") and data.num_classes == 12
    sizes = {name: len(split) for name, split in data.splits.items()}
    assert sizes == {"train": 24 + 6, "val": 12 + 3, "test": 12 + 3}  # 2, 1, 1 clips of 12 words, + 25% silence
    labels = data.splits["val"].labels.tolist()
    assert labels.count(0) == 2 and labels.count(1) == 3  # bed and cat are unknown
    assert sorted(set(labels)) == list(range(12))
    silence = data.splits["train"].images[data.splits["train"].labels == 1]
    assert silence.shape == (6, 16000) and not silence.any()  # the paper's silence: zero clips
    x, y = next(iter(data.val_dataloader()))
    assert x.shape == (15, 1, 32, 32) and x.dtype == torch.float32 and x.max() <= 0 and x.min() >= -80


def test_background_silence_is_cut_from_the_noise_files(speech):
    data = SpeechCommands(str(speech), silence="background", silence_fraction=0.25, words=("yes", "no"), cache=False)
    with pytest.raises(DataNotFoundError, match="folder of the word 'yes'"):
        data.setup("fit")
    data = SpeechCommands(str(speech), silence="background", silence_fraction=0.25, words=("one", "two"), cache=False)
    data.setup("fit")
    silence = data.splits["train"].images[data.splits["train"].labels == 1]
    assert len(silence) == 6 and (silence.float().std(dim=1) > 0).all()
    assert data.num_classes == 4 and (data.splits["train"].labels == 0).sum() == 20  # ten other words: unknown


class CountingDecode(SpeechCommands):
    decoded = 0

    def decode(self, files):
        CountingDecode.decoded += 1
        return super().decode(files)


def test_clips_are_decoded_once_and_the_cache_follows_the_files(speech):
    CountingDecode.decoded = 0
    first = CountingDecode(str(speech))
    first.setup("fit")
    (cache,) = (speech / ".netlab-cache").glob("speech-*.pt")
    second = CountingDecode(str(speech))
    second.setup("fit")
    assert CountingDecode.decoded == 1 and torch.equal(first.splits["train"].images, second.splits["train"].images)
    CountingDecode(str(speech), silence_fraction=0.5).setup("fit")  # other settings: another cache
    assert CountingDecode.decoded == 2
    write_wav(speech / "one" / "ffffffff_nohash_0.wav", tone(300))  # another file: rebuilt
    third = CountingDecode(str(speech))
    third.setup("fit")
    assert CountingDecode.decoded == 3 and len(third.splits["train"]) == len(first.splits["train"]) + 1
    newest = max((speech / ".netlab-cache").glob("speech-*.pt"), key=os.path.getmtime)
    newest.write_bytes(b"half a file")  # an unreadable cache is rebuilt, never trusted
    CountingDecode(str(speech)).setup("fit")
    assert CountingDecode.decoded == 4 and cache.is_file()
    assert not list((speech / ".netlab-cache").glob("*.tmp*"))  # written atomically


def test_balanced_order_draws_every_class_alike_and_shards_one_draw():
    labels = torch.tensor([0] * 90 + [1] * 10)
    order = BalancedOrder(labels, seed=0)
    draws = torch.cat([labels[order.indices()] for order.epoch in range(20)])
    assert 0.45 < draws.float().mean().item() < 0.55
    shards = [BalancedOrder(labels, seed=0, rank=r, world_size=2) for r in (0, 1)]
    whole = BalancedOrder(labels, seed=0).indices()
    assert sorted(torch.cat([s.indices() for s in shards]).tolist()) == sorted(whole.tolist())


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda root: shutil.rmtree(root), "Speech Commands folder not found"),
        (lambda root: (root / "testing_list.txt").unlink(), "split list not found: .*testing_list.txt"),
        (
            lambda root: (root / "one" / "00000000_nohash_0.wav").write_bytes(b"RIFF garbage"),
            "00000000_nohash_0.wav: not a readable wav",
        ),
        (lambda root: truncate(root / "two" / "00000000_nohash_0.wav"), "00000000_nohash_0.wav: truncated"),
        (
            lambda root: write_wav(root / "six" / "00000000_nohash_0.wav", tone(300, 8000), sample_rate=8000),
            "sample rate 8000 Hz, expected 16000 Hz",
        ),
    ],
    ids=["no-folder", "no-list", "corrupt-wav", "truncated-wav", "wrong-rate"],
)
def test_broken_data_is_one_clear_line(speech, break_it, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    break_it(speech)
    config = CONFIGS / "kwinners" / "gsc_sparse.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--data.data_dir", str(speech), "--wandb", "false"])
    assert str(exit_info.value.code).startswith("error: ")
    assert re.search(message, str(exit_info.value.code)), exit_info.value.code


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1000])


def test_read_wav_gives_the_samples_written(tmp_path):
    samples = tone(440, 1234)
    assert np.array_equal(read_wav(write_wav(tmp_path / "a.wav", samples)), samples)


# --- features against librosa (the test-only reference) -------------------------------------------


def test_mel_filterbank_equals_librosa():
    ours = mel_filterbank(16000, 2048, 32).double().numpy()
    assert np.allclose(ours, librosa.filters.mel(sr=16000, n_fft=2048, n_mels=32), atol=1e-7)


def test_log_mel_of_real_wav_files_equals_librosa(speech):
    clips = [read_wav(p) for p in sorted(speech.glob("*/0000000[02]_nohash_0.wav"))[:6]]
    clips.append(np.zeros(16000, dtype=np.int16))  # silence: all -0 dB relative to a zero maximum
    waves = np.stack([np.pad(c, (0, 16000 - len(c))) for c in clips]).astype(np.float32) / 32768
    ours = LogMel()(torch.from_numpy(waves)).squeeze(1).numpy()
    for clip, got in zip(waves, ours, strict=True):
        mel = librosa.feature.melspectrogram(y=clip, sr=16000, n_fft=2048, hop_length=512, n_mels=32)
        reference = librosa.power_to_db(mel, ref=np.max)
        assert got.shape == reference.shape == (32, 32)
        assert np.abs(got - reference).max() < 0.01  # dB, float32 against float64


def test_stretch_and_shift_from_the_moments_equal_the_phase_vocoder_on_the_stft():
    """The mel power of librosa's phase-vocoded STFT (rate r), shifted by k frames as the original shifts it,
    equals the framework's, which works on two mel moments per clip instead of the STFT."""
    clip = read_wav_tone()
    stft = librosa.stft(clip, n_fft=2048, hop_length=512)
    bank = librosa.filters.mel(sr=16000, n_fft=2048, n_mels=32)
    moments = LogMel().moments(torch.from_numpy(clip)[None])
    frames = stft.shape[1]
    for rate, shift in ((0.8, 3), (0.8, -4), (1.15, -5), (1.2, 6), (1.0, 0)):
        stretched = librosa.phase_vocoder(stft, rate=rate, hop_length=512)
        a, b = -min(0, shift), max(0, shift)  # the original's shift: pad, then cut the other end
        shifted = np.pad(stretched, ((0, 0), (a, b)))
        shifted = shifted[:, : shifted.shape[1] - a] if a else shifted[:, b:]
        shifted = np.pad(shifted, ((0, 0), (0, max(0, frames - shifted.shape[1]))))[:, :frames]
        reference = bank @ np.abs(shifted) ** 2
        times = shifted_times(torch.arange(frames, dtype=torch.float32), torch.tensor([rate]), torch.tensor([shift]))
        ours = stretched_mel(moments, times)[0].numpy()
        assert np.allclose(ours, reference, rtol=1e-3, atol=1e-6 * reference.max()), (rate, shift)


def read_wav_tone() -> np.ndarray:
    return tone(523, 16000).astype(np.float32) / 32768


def test_augmentations_keep_shapes_and_are_off_at_probability_zero():
    x = torch.from_numpy(np.stack([read_wav_tone()] * 4))
    features = LogMel()
    assert torch.allclose(features(x, AudioAugment(p=0.0)), features(x), atol=1e-5)
    torch.manual_seed(0)
    augmented = features(x, AudioAugment(p=1.0))
    assert augmented.shape == (4, 1, 32, 32) and not torch.equal(augmented, features(x))
    assert torch.equal(change_speed(x, torch.ones(4)), x)  # speed factor 1: identity
    faster = change_speed(torch.arange(10.0)[None], torch.tensor([2.0]))
    assert faster.tolist() == [[0.0, 2.0, 4.0, 6.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0]]  # every 2nd sample, then zeros


def test_waveform_noise_is_the_papers_mixture(speech):
    data = SpeechCommands(str(speech))
    data.setup("test")
    clean = data.splits["test"].images.float() / 32768
    loader_a, loader_b = (data.noise_dataloader("test", 0.5, seed=7) for _ in range(2))
    assert torch.equal(next(iter(loader_a))[0], next(iter(loader_b))[0])  # seeded: every model sees the same
    generator = torch.Generator().manual_seed(7)
    noise = torch.rand(clean.shape, generator=generator) * 2 - 1
    expected = LogMel()(0.5 * clean + 0.5 * noise)
    assert torch.allclose(next(iter(data.noise_dataloader("test", 0.5, seed=7)))[0], expected, atol=1e-4)
