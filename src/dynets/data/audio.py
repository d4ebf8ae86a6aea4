"""Spoken digits (FSDD) as log-mel or MFCC frames, computed with numpy/scipy only (no torchaudio).

The feature pipeline, one function per step so each can be checked on its own:

  wav (int16, 8 kHz mono)  --read_wav-->  float32 in [-1, 1]    (other rates are resampled)
  pre-emphasis y[n] = x[n] - 0.97 x[n-1]
  power_spectrogram:  25 ms Hann frames (200 samples) every 10 ms (80), |rfft(n_fft=256)|^2 / n_fft
  mel_filterbank:     40 triangular filters, equally spaced on the HTK mel scale, 0 Hz to Nyquist
  log_mel:            log(max(mel power, 1e-10))                                  -> (T, 40)
  mfcc:               orthonormal DCT-II over the mel axis, first 13 coefficients -> (T, 13)

Leading and trailing silence is trimmed (frames more than ``trim_db`` below the loudest frame), then
each clip keeps at most ``max_frames`` frames and is zero-padded to that length; ``lengths`` keeps the
valid count. Features are standardised per coefficient with statistics of the ``train`` split
(valid frames only), so every split shares one scale and padding sits at the mean (0).

Split: FSDD's official one, recordings with index 0-4 are ``test`` (300 clips, every speaker and
digit); ``val`` is ``VAL_FRACTION`` of the rest (seed-0 permutation) and ``train`` the remainder. The
split is speaker-dependent: the same six speakers appear in every split. Decoded features are cached
under ``cache_dir()`` keyed by the archive and the feature settings.
"""

from __future__ import annotations

import io
import lzma
import re
import tarfile
import warnings
import zlib
from dataclasses import asdict, dataclass
from math import gcd
from pathlib import Path

import numpy as np
import scipy.fft
import scipy.io.wavfile
import scipy.signal
import torch

from . import readers
from .datasets import SequenceDataset

__all__ = [
    "FEATURE_KINDS",
    "FSDD_ARCHIVE",
    "FeatureConfig",
    "features",
    "hz_to_mel",
    "load_fsdd",
    "log_mel",
    "mel_filterbank",
    "mel_to_hz",
    "mfcc",
    "power_spectrogram",
    "read_wav",
]

FSDD_ARCHIVE = "fsdd-recordings.tar.xz"
FEATURE_KINDS = ("mfcc", "logmel")
VAL_FRACTION = 0.1
_NAME = re.compile(r"(?:^|/)(\d)_([A-Za-z]+)_(\d+)\.wav$")


@dataclass(frozen=True)
class FeatureConfig:
    """Every setting that decides the features (part of the cache key)."""

    kind: str = "mfcc"  # "mfcc" or "logmel"
    sample_rate: int = 8000
    win_length: int = 200  # 25 ms
    hop_length: int = 80  # 10 ms
    n_fft: int = 256
    n_mels: int = 40
    n_mfcc: int = 13
    fmin: float = 0.0
    fmax: float | None = None  # None = Nyquist
    preemphasis: float = 0.97
    trim_db: float | None = 40.0  # None = keep silence
    max_frames: int = 64  # 0.65 s of speech after trimming; longer clips are cut

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"features: expected one of {FEATURE_KINDS}, got {self.kind!r}")
        if not 0 < self.win_length <= self.n_fft or self.hop_length < 1:
            raise ValueError(
                f"expected 0 < win_length <= n_fft and hop_length >= 1, got win_length={self.win_length}, "
                f"n_fft={self.n_fft}, hop_length={self.hop_length}"
            )
        if self.n_mfcc > self.n_mels or self.max_frames < 1:
            raise ValueError(f"expected n_mfcc <= n_mels and max_frames >= 1, got {self}")

    @property
    def num_features(self) -> int:
        return self.n_mfcc if self.kind == "mfcc" else self.n_mels


def read_wav(source: str | Path | bytes, sample_rate: int = 8000, what: str | None = None) -> np.ndarray:
    """A wav file (path or bytes) as float32 mono in [-1, 1] at ``sample_rate`` (resampled if needed)."""
    what = what or (str(source) if not isinstance(source, bytes) else "wav data")
    try:
        rate, data = scipy.io.wavfile.read(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (ValueError, EOFError, OSError, IndexError) as e:  # scipy raises these on corrupt headers
        raise ValueError(f"{what}: not a readable WAV file ({e}); expected PCM or float WAV data") from e
    if data.dtype.kind == "i":
        signal = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    elif data.dtype == np.uint8:  # 8-bit WAV is unsigned, centred on 128
        signal = (data.astype(np.float32) - 128.0) / 128.0
    elif data.dtype.kind == "f":
        signal = data.astype(np.float32)
    else:
        raise ValueError(f"{what}: unsupported WAV sample type {data.dtype}; expected int or float PCM")
    if signal.ndim == 2:
        signal = signal.mean(axis=1)  # (n, channels) -> mono
    if signal.size == 0:
        raise ValueError(f"{what}: the WAV file holds no samples; expected at least one")
    if not np.isfinite(signal).all():
        raise ValueError(f"{what}: the WAV file holds NaN or inf samples")
    if rate != sample_rate:
        g = gcd(int(rate), int(sample_rate))
        signal = scipy.signal.resample_poly(signal, sample_rate // g, rate // g).astype(np.float32)
    return signal


def power_spectrogram(signal: np.ndarray, cfg: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """(T, n_fft // 2 + 1) power of Hann-windowed frames; a clip shorter than one window gives 1 frame."""
    x = np.asarray(signal, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"signal: expected a non-empty 1-D array, got shape {x.shape}")
    if cfg.preemphasis:
        x = np.concatenate([x[:1], x[1:] - cfg.preemphasis * x[:-1]])
    if x.size < cfg.win_length:
        x = np.pad(x, (0, cfg.win_length - x.size))
    frames = np.lib.stride_tricks.sliding_window_view(x, cfg.win_length)[:: cfg.hop_length]  # (T, win)
    window = scipy.signal.get_window("hann", cfg.win_length, fftbins=True)  # periodic Hann
    spec = np.fft.rfft(frames * window, n=cfg.n_fft, axis=-1)
    return (spec.real**2 + spec.imag**2) / cfg.n_fft


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters (peak 1) with centres equally spaced in mel."""
    fmax = sample_rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"expected 0 <= fmin < fmax <= {sample_rate / 2} Hz, got fmin={fmin}, fmax={fmax}")
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))  # (n_mels + 2,) Hz
    freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft  # (n_bins,) Hz
    lo, centre, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - lo) / (centre - lo)
    falling = (hi - freqs[None, :]) / (hi - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


def log_mel(signal: np.ndarray, cfg: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """(T, n_mels) log mel-band power."""
    bank = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
    return np.log(np.maximum(power_spectrogram(signal, cfg) @ bank.T, 1e-10))


def mfcc(signal: np.ndarray, cfg: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """(T, n_mfcc) mel-frequency cepstral coefficients: orthonormal DCT-II of the log-mel frames."""
    return scipy.fft.dct(log_mel(signal, cfg), type=2, norm="ortho", axis=-1)[:, : cfg.n_mfcc]


def features(signal: np.ndarray, cfg: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """(T, F) float32 features of one clip, silence trimmed and cut to cfg.max_frames."""
    power = power_spectrogram(signal, cfg)
    bank = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
    feats = np.log(np.maximum(power @ bank.T, 1e-10))
    if cfg.kind == "mfcc":
        feats = scipy.fft.dct(feats, type=2, norm="ortho", axis=-1)[:, : cfg.n_mfcc]
    if cfg.trim_db is not None:
        energy_db = 10.0 * np.log10(np.maximum(power.sum(axis=1), 1e-20))
        loud = np.flatnonzero(energy_db >= energy_db.max() - cfg.trim_db)
        feats = feats[loud[0] : loud[-1] + 1]
    return feats[: cfg.max_frames].astype(np.float32)


def _decode_archive(archive: Path, cfg: FeatureConfig) -> dict[str, np.ndarray]:
    """Every clip of the archive: x (N, max_frames, F) zero-padded, lengths, digit, speaker, index."""
    clips: list[tuple[str, int, str, int, np.ndarray]] = []
    try:
        with tarfile.open(archive, "r:xz") as tf:
            for member in tf:
                match = _NAME.search(member.name)
                if not member.isfile() or match is None:
                    continue
                data = tf.extractfile(member).read()
                signal = read_wav(data, cfg.sample_rate, what=f"{archive}:{member.name}")
                digit, speaker, index = int(match[1]), match[2], int(match[3])
                clips.append((member.name, digit, speaker, index, features(signal, cfg)))
    except (tarfile.TarError, lzma.LZMAError, EOFError, zlib.error) as e:
        raise ValueError(f"{archive}: truncated or corrupt tar.xz archive ({e})") from e
    if not clips:
        raise ValueError(f"{archive}: expected members fsdd/recordings/<digit>_<speaker>_<index>.wav")
    clips.sort(key=lambda c: c[0])
    x = np.zeros((len(clips), cfg.max_frames, cfg.num_features), dtype=np.float32)
    for i, c in enumerate(clips):
        x[i, : len(c[4])] = c[4]
    return {
        "x": x,
        "lengths": np.array([len(c[4]) for c in clips], dtype=np.int64),
        "digit": np.array([c[1] for c in clips], dtype=np.int64),
        "speaker": np.array([c[2] for c in clips]),
        "index": np.array([c[3] for c in clips], dtype=np.int64),
    }


def read_fsdd(archive: Path, cfg: FeatureConfig = FeatureConfig()) -> dict[str, np.ndarray]:
    """``_decode_archive`` through the .npz cache (keyed by the archive and every feature setting)."""
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(
            f"FSDD archive not found: {archive}; set DYNETS_DATA to the folder that holds data/{FSDD_ARCHIVE}"
        )
    key = readers._source_key(archive) + "|" + repr(sorted(asdict(cfg).items()))
    path = readers.cache_path(archive, f"fsdd-{cfg.kind}")
    arrays = readers._read_cache(path, key)
    if arrays is None:
        arrays = _decode_archive(archive, cfg)
        try:
            readers.atomic_savez(path, {**arrays, "key": np.array(key)})
        except OSError as e:  # a read-only cache folder costs speed, not correctness
            warnings.warn(f"could not write cache {path}: {e}", RuntimeWarning, stacklevel=2)
    return arrays


def fsdd_split_indices(index: np.ndarray, digit: np.ndarray) -> dict[str, np.ndarray]:
    """The official split (index 0-4 = test, class-interleaved) and a seed-0 val carve of the rest."""
    test = np.flatnonzero(index < 5)
    test = test[readers.interleave_classes(digit[test])]
    rest = np.flatnonzero(index >= 5)
    perm = rest[np.random.default_rng(0).permutation(len(rest))]
    n_val = round(VAL_FRACTION * len(rest))
    return {"test": test, "val": perm[:n_val], "train": perm[n_val:]}


def load_fsdd(
    archive: Path, split: str, *, features: str = "mfcc", limit: int | None = None, **settings: object
) -> SequenceDataset:
    """One split of FSDD as a SequenceDataset: x (N, T, F) standardised features, y = digit, lengths.

    ``features`` is "mfcc" (F = 13) or "logmel" (F = 40); ``settings`` override other FeatureConfig
    fields (e.g. max_frames=48).
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be one of 'train', 'val', 'test'; got {split!r}")
    cfg = FeatureConfig(kind=features.lower(), **settings)
    arrays = read_fsdd(Path(archive), cfg)
    parts = fsdd_split_indices(arrays["index"], arrays["digit"])
    x, lengths = arrays["x"], arrays["lengths"]
    train = parts["train"]
    valid = np.arange(x.shape[1])[None, :] < lengths[train, None]  # (N_train, T)
    frames = x[train][valid]  # (frames, F)
    mean, std = frames.mean(0), frames.std(0) + 1e-6
    idx = parts[split] if limit is None else parts[split][:limit]
    xs = (x[idx] - mean) / std
    xs[np.arange(x.shape[1])[None, :] >= lengths[idx, None]] = 0.0  # padding stays at 0
    info = {
        "features": asdict(cfg),
        "feature_mean": mean.tolist(),
        "feature_std": std.tolist(),
        "speakers": arrays["speaker"][idx].tolist(),
        "recording_index": arrays["index"][idx].tolist(),
        "split_rule": "official: recording index 0-4 is test; val = 10% of the rest (seed 0)",
    }
    return SequenceDataset(
        torch.from_numpy(xs.astype(np.float32)),
        torch.from_numpy(arrays["digit"][idx]),
        [str(d) for d in range(10)],
        f"fsdd:{cfg.kind}",
        split,
        torch.from_numpy(lengths[idx]),
        info,
    )
