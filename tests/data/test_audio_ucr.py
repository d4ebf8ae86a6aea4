"""Sequence data: MFCC / log-mel features vs a naive computation, the FSDD and UCR loaders, bad input."""

from __future__ import annotations

import io
import math
import tarfile

import numpy as np
import pytest
import scipy.io.wavfile
import torch

from dynets.data import audio, load_dataset
from dynets.data.audio import FeatureConfig, log_mel, mfcc, read_wav
from dynets.data.datasets import SequenceDataset

SR = 8000


def _tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def _naive_mfcc(signal: np.ndarray, cfg: FeatureConfig) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel and MFCC written out from the textbook formulas with loops (no FFT, no filter matrix)."""
    x = signal.astype(np.float64)
    x = np.array([x[0]] + [x[n] - cfg.preemphasis * x[n - 1] for n in range(1, len(x))])
    n_frames = 1 + (len(x) - cfg.win_length) // cfg.hop_length
    win = np.array([0.5 - 0.5 * math.cos(2 * math.pi * n / cfg.win_length) for n in range(cfg.win_length)])
    bins = cfg.n_fft // 2 + 1
    dft = np.exp(-2j * np.pi * np.outer(np.arange(bins), np.arange(cfg.win_length)) / cfg.n_fft)

    def mel(f):
        return 2595 * math.log10(1 + f / 700)

    def hz(m):
        return 700 * (10 ** (m / 2595) - 1)

    top = mel(SR / 2)
    edges = [hz(top * i / (cfg.n_mels + 1)) for i in range(cfg.n_mels + 2)]
    logmel = np.zeros((n_frames, cfg.n_mels))
    for t in range(n_frames):
        frame = x[t * cfg.hop_length : t * cfg.hop_length + cfg.win_length] * win
        power = np.abs(dft @ frame) ** 2 / cfg.n_fft
        for m in range(cfg.n_mels):
            lo, centre, hi = edges[m], edges[m + 1], edges[m + 2]
            total = 0.0
            for k in range(bins):
                f = k * SR / cfg.n_fft
                if lo < f < hi:
                    total += power[k] * (
                        (f - lo) / (centre - lo) if f <= centre else (hi - f) / (hi - centre)
                    )
            logmel[t, m] = math.log(max(total, 1e-10))
    M = cfg.n_mels
    dct = np.array(
        [
            [
                math.sqrt((1 if k == 0 else 2) / M) * math.cos(math.pi * k * (2 * m + 1) / (2 * M))
                for m in range(M)
            ]
            for k in range(cfg.n_mfcc)
        ]
    )
    return logmel, logmel @ dct.T


def test_mfcc_equals_naive_computation_and_tone_peaks_in_its_mel_band():
    cfg = FeatureConfig()
    rng = np.random.default_rng(0)
    signal = _tone(1000.0, 0.12) + 0.01 * rng.standard_normal(960).astype(np.float32)
    want_logmel, want_mfcc = _naive_mfcc(signal, cfg)
    got_logmel, got_mfcc = log_mel(signal, cfg), mfcc(signal, cfg)
    assert got_logmel.shape == (10, 40) and got_mfcc.shape == (10, 13)
    np.testing.assert_allclose(got_logmel, want_logmel, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got_mfcc, want_mfcc, rtol=1e-9, atol=1e-9)
    # the tone's energy sits in the band whose centre is nearest 1000 Hz (HTK mel, 40 bands to 4 kHz)
    centres = [700 * (10 ** (2595 * math.log10(1 + 4000 / 700) * (m + 1) / 41 / 2595) - 1) for m in range(40)]
    assert int(got_logmel.mean(0).argmax()) == int(np.argmin(np.abs(np.array(centres) - 1000.0)))
    low = log_mel(_tone(300.0, 0.12), cfg).mean(0).argmax()
    assert low < got_logmel.mean(0).argmax()  # a lower tone peaks in a lower band


def test_features_trim_silence_and_cap_frames():
    cfg = FeatureConfig(max_frames=30)
    quiet = np.zeros(2000, dtype=np.float32)
    clip = np.concatenate([quiet, _tone(700, 0.2), quiet])  # 0.2 s of tone = ~18 frames of 10 ms
    feats = audio.features(clip, cfg)
    assert feats.dtype == np.float32 and feats.shape[1] == 13 and 17 <= len(feats) <= 22
    assert len(audio.features(_tone(700, 1.0), cfg)) == 30  # cut to max_frames
    assert audio.features(_tone(700, 0.01), cfg).shape == (1, 13)  # shorter than a window: one frame


def _wav_bytes(signal: np.ndarray, sr: int = SR) -> bytes:
    buf = io.BytesIO()
    scipy.io.wavfile.write(buf, sr, signal)
    return buf.getvalue()


def test_read_wav_formats_and_errors(tmp_path):
    pcm = (np.linspace(-1, 1, 800) * 32000).astype(np.int16)
    np.testing.assert_allclose(read_wav(_wav_bytes(pcm)), pcm / 32768.0, rtol=0, atol=1e-7)
    stereo = np.stack([pcm, np.zeros_like(pcm)], 1)
    np.testing.assert_allclose(read_wav(_wav_bytes(stereo)), pcm / 65536.0, atol=1e-7)
    assert len(read_wav(_wav_bytes(pcm, sr=16000))) == 400  # resampled to 8 kHz
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage")
    with pytest.raises(ValueError, match=r"broken\.wav: not a readable WAV file"):
        read_wav(bad)
    with pytest.raises(ValueError, match="no samples"):
        read_wav(_wav_bytes(np.zeros(0, dtype=np.int16)), what="empty.wav")


def _fake_fsdd(root, corrupt: bool = False):
    """root/data/fsdd-recordings.tar.xz: digits 0-2, speakers a and b, recordings 0-7 (tones)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    path = root / "data" / "fsdd-recordings.tar.xz"
    with tarfile.open(path, "w:xz") as tf:
        for d in range(3):
            for spk in ("a", "b"):
                for i in range(8):
                    sig = (_tone(400 + 300 * d, 0.1 + 0.02 * i) * 30000).astype(np.int16)
                    data = b"not a wav" if corrupt and (d, spk, i) == (2, "b", 7) else _wav_bytes(sig)
                    info = tarfile.TarInfo(f"fsdd/recordings/{d}_{spk}_{i}.wav")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return path


def test_fsdd_loader_split_features_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNETS_CACHE", str(tmp_path / "cache"))
    _fake_fsdd(tmp_path)
    parts = {s: load_dataset("fsdd", s, root=tmp_path) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in parts.items()} == {"train": 16, "val": 2, "test": 30}
    index = {s: d.info["recording_index"] for s, d in parts.items()}
    assert all(i < 5 for i in index["test"]) and all(i >= 5 for s in ("train", "val") for i in index[s])
    test = parts["test"]
    assert (
        isinstance(test, SequenceDataset) and test.input_shape == (64, 13) and test.x.dtype == torch.float32
    )
    assert test.y[:3].tolist() == [0, 1, 2] and test.classes == [str(d) for d in range(10)]
    train = parts["train"]
    valid = torch.arange(64)[None] < train.lengths[:, None]
    frames = train.x[valid]  # standardised with the train split's own statistics
    torch.testing.assert_close(frames.mean(0), torch.zeros(13), atol=1e-4, rtol=0)
    torch.testing.assert_close(frames.std(0, unbiased=False), torch.ones(13), atol=1e-3, rtol=0)
    assert bool((train.x[~valid] == 0).all())
    monkeypatch.setattr(audio, "_decode_archive", lambda *a: pytest.fail("cache miss: decoded again"))
    again = load_dataset("fsdd", "test", root=tmp_path, limit=5)
    assert torch.equal(again.x, test.x[:5])
    with pytest.raises(ValueError, match="features: expected one of"):
        load_dataset("fsdd:spectrogram", "test", root=tmp_path)


def test_fsdd_corrupt_wav_names_the_member(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNETS_CACHE", str(tmp_path / "cache"))
    _fake_fsdd(tmp_path, corrupt=True)
    with pytest.raises(ValueError, match=r"2_b_7\.wav: not a readable WAV file"):
        load_dataset("fsdd:logmel", "train", root=tmp_path)


def _fake_ucr(root, rows_train: str, rows_test: str, name: str = "Toy"):
    (root / "data").mkdir(parents=True, exist_ok=True)
    path = root / "data" / "ucr-subset.tar.xz"
    with tarfile.open(path, "w:xz") as tf:
        for suffix, text in (("_TRAIN.tsv", rows_train), ("_TEST.tsv", rows_test)):
            data = text.encode()
            info = tarfile.TarInfo(f"{name}{suffix}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_ucr_loader_labels_lengths_and_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNETS_CACHE", str(tmp_path / "cache"))
    train = "".join(f"{1 if i % 2 else -1}\t{i}\t{i + 0.5}\t{'NaN' if i < 3 else 7}\n" for i in range(10))
    test = "1\t1\t2\t3\n1\t4\t5\tNaN\n-1\t6\t7\t8\n"
    _fake_ucr(tmp_path, train, test)
    parts = {s: load_dataset("ucr:toy", s, root=tmp_path) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in parts.items()} == {"train": 8, "val": 2, "test": 3}
    t = parts["test"]
    assert t.classes == ["-1", "1"] and t.input_shape == (3, 1) and t.name == "ucr:toy"
    assert t.y.tolist() == [0, 1, 1]  # interleaved by class: one of each in turn
    assert t.x[:, :, 0].tolist() == [[6, 7, 8], [1, 2, 3], [4, 5, 0]] and t.lengths.tolist() == [3, 3, 2]
    rows = torch.cat([parts["train"].x, parts["val"].x])[:, 0, 0].sort().values
    assert rows.tolist() == list(range(10))  # train and val split the archive's training file
    short = torch.cat([parts["train"].x, parts["val"].x])
    lengths = torch.cat([parts["train"].lengths, parts["val"].lengths])
    assert (lengths == torch.where(short[:, 0, 0] < 3, 2, 3)).all()  # trailing NaN = padding


def test_ucr_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNETS_CACHE", str(tmp_path / "cache"))
    _fake_ucr(tmp_path, "1\t1\tNaN\t3\n", "1\t1\t2\t3\n")
    with pytest.raises(ValueError, match=r"Toy_TRAIN\.tsv: row 1 has missing values inside the series"):
        load_dataset("ucr:Toy", "train", root=tmp_path)
    with pytest.raises(ValueError, match=r"UCR set 'Nope' not found .* expected one of \['Toy'\]"):
        load_dataset("ucr:Nope", "train", root=tmp_path)
    with pytest.raises(ValueError, match="expected 'ucr:NAME'"):
        load_dataset("ucr", "train", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="DYNETS_DATA"):
        load_dataset("ucr:Toy", "train", root=tmp_path / "missing")
    with pytest.raises(ValueError, match="ucr:NAME"):
        load_dataset("ucrx:Toy")


# ----------------------------------------------------------------------------------------- shared data


def test_real_ucr_sets(require_shared):
    require_shared("data/ucr-subset.tar.xz")
    parts = {s: load_dataset("ucr:ECG200", s) for s in ("train", "val", "test")}
    assert {s: tuple(d.x.shape) for s, d in parts.items()} == {
        "train": (80, 96, 1),
        "val": (20, 96, 1),
        "test": (100, 96, 1),
    }
    assert parts["test"].classes == ["-1", "1"] and torch.bincount(parts["test"].y).tolist() == [36, 64]
    ecg = load_dataset("ucr:ECG5000", "test", limit=10)
    assert ecg.input_shape == (140, 1) and ecg.num_classes == 5 and bool((ecg.lengths == 140).all())


def test_real_fsdd(require_shared):
    require_shared("data/fsdd-recordings.tar.xz")
    parts = {s: load_dataset("fsdd", s) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in parts.items()} == {"train": 2430, "val": 270, "test": 300}
    test = parts["test"]
    assert test.input_shape == (64, 13) and torch.bincount(test.y).tolist() == [30] * 10
    assert set(test.info["recording_index"]) == {0, 1, 2, 3, 4} and len(set(test.info["speakers"])) == 6
    assert 20 < float(test.lengths.float().mean()) < 64
