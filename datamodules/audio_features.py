"""Log-mel features of 1 s clips and the Speech Commands augmentations, in batches on the clips' device.

Features (the spec's, librosa's defaults): |STFT| with n_fft 2048, hop 512, periodic Hann, centred
with zero padding; power through a 32-band Slaney mel filter bank; dB relative to each clip's
maximum, floored at -80 dB. At 16 kHz a 1 s clip gives 32 frames: a 1x32x32 image (mels x frames).

Augmentations (training only, as the original's transforms, each on a sample with probability 0.5):
amplitude x U(0.7, 1.1) and a speed change of up to +-20% on the waveform; a time stretch of up to
+-20% and a time shift of up to +-8 frames on the STFT. The stretch is the phase vocoder's
interpolation of magnitudes, |S(t)| = (1 - a) |S_i| + a |S_i+1|, whose mel power expands exactly into
(1 - a)^2 M|S_i|^2 + 2a(1 - a) M(|S_i||S_i+1|) + a^2 M|S_i+1|^2. So a clip is summarised by two mel
"moments" (M|S|^2 and M of neighbouring frames' magnitude products, 2 x 32 x 32 values), computed
once and kept; stretch, shift and amplitude act on them exactly, and only a clip whose speed changes
needs its STFT again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per factor 6.4)."""
    linear = hz / (200.0 / 3)
    log = 15.0 + torch.log(hz.clamp(min=1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return torch.where(hz >= 1000.0, log, linear)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    linear = mel * (200.0 / 3)
    log = 1000.0 * torch.exp((math.log(6.4) / 27.0) * (mel - 15.0))
    return torch.where(mel >= 15.0, log, linear)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> torch.Tensor:
    """(n_mels, 1 + n_fft // 2) triangular filters on the Slaney mel scale, each normalised to unit area
    (weights x 2 / bandwidth in Hz), as librosa.filters.mel with its defaults."""
    fmax = sample_rate / 2 if fmax is None else fmax
    freqs = torch.linspace(0, sample_rate / 2, 1 + n_fft // 2, dtype=torch.float64)
    lo, hi = (float(hz_to_mel(torch.tensor(f, dtype=torch.float64))) for f in (fmin, fmax))
    edges = mel_to_hz(torch.linspace(lo, hi, n_mels + 2, dtype=torch.float64))
    widths = edges.diff()
    ramps = edges[:, None] - freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.float()


def change_speed(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """(N, L) clips played `factor` (N,) times as fast (pitch changes with it): output sample t is input
    sample round(t * factor), zero past the end, the original's nearest-sample resampling; length stays L."""
    length = x.shape[1]
    index = (torch.arange(length, device=x.device) * factor[:, None]).round_().long()
    inside = index < length
    return x.gather(1, index.clamp_(max=length - 1)) * inside


def shifted_times(t: torch.Tensor, rate: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Source times of output frames `t` after a stretch by `rate` (N,) and a shift by `shift` (N,) frames, as
    the original shifts: within the stretched clip's own length ceil(T / rate), so a negative shift also
    drops that clip's last frames. -1 marks an empty frame."""
    frames = len(t)
    source = t + shift[:, None]
    valid = (source >= 0) & (t * rate[:, None] < frames)
    return torch.where(valid, source * rate[:, None], -1.0)


def stretched_mel(moments: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """The mel power of the magnitudes interpolated at `times` (N, T'), from the moments (N, 2, M, T); exact."""
    power, cross = moments[:, 0], moments[:, 1]
    frames = power.shape[2]
    left = times.floor().long()
    a = (times - left)[:, None, :]
    valid = ((left >= 0) & (left < frames))[:, None, :]

    def at(m: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        index = i.clamp(0, frames - 1)[:, None, :].expand(-1, m.shape[1], -1)
        return m.gather(2, index) * (i < frames)[:, None, :]

    mel = (1 - a).square() * at(power, left) + 2 * a * (1 - a) * at(cross, left) + a.square() * at(power, left + 1)
    return mel * valid


class LogMel:
    """(N, L) waveforms in [-1, 1] -> (N, 1, n_mels, frames) log-mel images in dB (max 0, floor -top_db)."""

    def __init__(
        self, sample_rate: int = 16000, n_fft: int = 2048, hop: int = 512, n_mels: int = 32, top_db: float = 80.0
    ):
        self.sample_rate, self.n_fft, self.hop, self.n_mels, self.top_db = sample_rate, n_fft, hop, n_mels, top_db
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _window_and_bank(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._cache:
            window = torch.hann_window(self.n_fft, periodic=True, device=device)
            self._cache[device] = window, mel_filterbank(self.sample_rate, self.n_fft, self.n_mels).to(device)
        return self._cache[device]

    def power(self, x: torch.Tensor) -> torch.Tensor:
        """|STFT|^2 as (N, frames, 1 + n_fft // 2), centred with zero padding (frames first: the mel
        projection then reads contiguous rows)."""
        window, _ = self._window_and_bank(x.device)
        half = self.n_fft // 2
        frames = torch.nn.functional.pad(x, (half, half)).unfold(-1, self.n_fft, self.hop) * window
        spec = torch.fft.rfft(frames)
        return spec.real.square() + spec.imag.square()

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 2, n_mels, frames): M|S_t|^2 and M(|S_t| |S_t+1|) (zero at the last frame), M the mel bank."""
        _, bank = self._window_and_bank(x.device)
        power = self.power(x)
        cross = (power[:, :-1] * power[:, 1:]).sqrt_() @ bank.T
        cross = torch.nn.functional.pad(cross, (0, 0, 0, 1))  # no frame after the last: 0
        return torch.stack([power @ bank.T, cross], dim=1).transpose(-1, -2)

    def to_db(self, mel: torch.Tensor) -> torch.Tensor:
        """Mel power (N, M, T) -> dB relative to each clip's maximum, floored at -top_db, as (N, 1, M, T)."""
        db = 10.0 * torch.log10(mel.clamp(min=1e-10))
        ref = 10.0 * torch.log10(mel.amax(dim=(1, 2), keepdim=True).clamp(min=1e-10))
        return (db - ref).clamp(min=-self.top_db).unsqueeze(1)

    def __call__(self, x: torch.Tensor, augment: AudioAugment | None = None) -> torch.Tensor:
        if augment is None:
            return self.to_db(self.moments(x)[:, 0])
        return augment(x, self, self.moments(x))


@dataclass
class AudioAugment:
    """The original's training augmentations; each applies to a share `p` of a batch's samples."""

    p: float = 0.5
    amplitude: tuple[float, float] = (0.7, 1.1)
    speed: float = 0.2
    stretch: float = 0.2
    shift: int = 8

    def _chosen(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.rand(n, device=device) < self.p

    def frame_times(self, n: int, frames: int, device: torch.device) -> torch.Tensor:
        """(N, frames) source times of each output frame: stretched by a rate, then shifted (zeros outside)."""
        t = torch.arange(frames, device=device, dtype=torch.float32)
        rate = torch.empty(n, device=device).uniform_(1 - self.stretch, 1 + self.stretch)
        rate = torch.where(self._chosen(n, device), rate, 1.0)
        shift = torch.randint(-self.shift, self.shift + 1, (n,), device=device)
        shift = torch.where(self._chosen(n, device), shift, 0)
        return shifted_times(t, rate, shift)

    def __call__(self, x: torch.Tensor, features: LogMel, moments: torch.Tensor) -> torch.Tensor:
        """Augmented features of (N, L) clips whose unaugmented moments are `moments`.

        The speed changes a fixed round(p * N) random samples of the batch (so nothing waits on the host for
        how many); only those are resampled and featurised again.
        """
        n = len(x)
        changed = torch.randperm(n, device=x.device)[: round(self.p * n)]
        if self.speed and len(changed):
            factor = torch.empty(len(changed), device=x.device).uniform_(1 - self.speed, 1 + self.speed)
            moments = moments.index_copy(0, changed, features.moments(change_speed(x[changed], factor)))
        lo, hi = self.amplitude
        gain = torch.where(self._chosen(n, x.device), torch.empty(n, device=x.device).uniform_(lo, hi), 1.0)
        moments = moments * gain.square().view(n, 1, 1, 1)  # x g scales every power by g^2
        frames = moments.shape[-1]
        return features.to_db(stretched_mel(moments, self.frame_times(n, frames, x.device)))
