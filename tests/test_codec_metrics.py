"""Tests for sfm.eval.codec_metrics against known values."""

from __future__ import annotations

import numpy as np
import pytest

from sfm.codec.config import MEL_SCALES
from sfm.codec.mel import LOG_FLOOR, mel_filterbank
from sfm.eval.codec_metrics import mel_distance, si_sdr

RATE = 24000


@pytest.fixture(scope="module")
def speechlike() -> np.ndarray:
    """One second of a few harmonics with an envelope, plus a little noise."""
    rng = np.random.default_rng(0)
    t = np.arange(RATE) / RATE
    wav = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((150, 300, 450, 1200), 1))
    wav = wav * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(RATE)
    return (0.3 * wav).astype(np.float32)


def _noise_at_snr(ref: np.ndarray, snr_db: float, seed: int = 1) -> np.ndarray:
    """White noise scaled so that 10 log10(|ref - mean|^2 / |noise - mean|^2) == snr_db."""
    noise = np.random.default_rng(seed).standard_normal(ref.size)
    noise -= noise.mean()
    # Remove the part of the noise along ref, so SI-SDR sees exactly this SNR.
    r = ref - ref.mean()
    noise -= np.dot(noise, r) / np.dot(r, r) * r
    return noise * np.sqrt(np.sum(r**2) / np.sum(noise**2) / 10 ** (snr_db / 10))


def test_si_sdr_identical_is_huge(speechlike: np.ndarray) -> None:
    assert si_sdr(speechlike, speechlike) > 100.0


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0, 30.0])
def test_si_sdr_matches_known_snr(speechlike: np.ndarray, snr_db: float) -> None:
    est = speechlike + _noise_at_snr(speechlike, snr_db)
    assert si_sdr(speechlike, est) == pytest.approx(snr_db, abs=0.5)


def test_si_sdr_plain_white_noise_snr() -> None:
    rng = np.random.default_rng(3)
    ref = rng.standard_normal(RATE)
    est = ref + rng.standard_normal(RATE) * 10 ** (-15 / 20)
    assert si_sdr(ref, est) == pytest.approx(15.0, abs=0.5)


def test_si_sdr_is_scale_and_offset_invariant(speechlike: np.ndarray) -> None:
    est = speechlike + _noise_at_snr(speechlike, 12.0)
    base = si_sdr(speechlike, est)
    assert si_sdr(speechlike, 0.1 * est) == pytest.approx(base, abs=1e-6)
    assert si_sdr(speechlike, 7.0 * est + 0.2) == pytest.approx(base, abs=1e-6)


def test_metrics_trim_to_common_length(speechlike: np.ndarray) -> None:
    longer = np.concatenate([speechlike, np.ones(500, np.float32)])
    assert si_sdr(speechlike, longer) > 100.0
    assert mel_distance(longer, speechlike, RATE) == 0.0


def test_mel_distance_identical_is_zero(speechlike: np.ndarray) -> None:
    assert mel_distance(speechlike, speechlike, RATE) == 0.0


def test_mel_distance_grows_with_noise(speechlike: np.ndarray) -> None:
    d = [
        mel_distance(speechlike, speechlike + _noise_at_snr(speechlike, s), RATE)
        for s in (30.0, 10.0, 0.0)
    ]
    assert 0.0 < d[0] < d[1] < d[2]


def test_mel_distance_of_gain_is_log10_of_gain(speechlike: np.ndarray) -> None:
    # A gain g shifts every (unfloored) log-mel bin by log10(g).
    assert mel_distance(speechlike, 2.0 * speechlike, RATE) == pytest.approx(
        np.log10(2.0), abs=0.02
    )


def stft_magnitude(wav: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Reference magnitude STFT in float64: periodic Hann window, centred frames."""
    padded = np.pad(wav, (n_fft // 2, n_fft // 2))
    n_frames = 1 + (padded.size - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
    return np.abs(np.fft.rfft(padded[idx] * window, axis=-1))


def reference_mel_distance(ref: np.ndarray, est: np.ndarray, rate: int) -> float:
    """The multi-scale log-mel L1 written out in float64 numpy."""

    def log_mel(x: np.ndarray, n_fft: int, n_mels: int) -> np.ndarray:
        mel = (
            stft_magnitude(x.astype(np.float64), n_fft, n_fft // 4)
            @ mel_filterbank(rate, n_fft, n_mels).T
        )
        return np.log10(np.maximum(mel, LOG_FLOOR))

    return float(
        np.mean([np.mean(np.abs(log_mel(ref, *s) - log_mel(est, *s))) for s in MEL_SCALES])
    )


def test_mel_distance_matches_a_float64_reference(speechlike: np.ndarray) -> None:
    noisy = speechlike + _noise_at_snr(speechlike, 10.0)
    want = reference_mel_distance(speechlike, noisy, RATE)
    assert want > 0.05
    assert mel_distance(speechlike, noisy, RATE) == pytest.approx(want, rel=1e-3)


def test_mel_filterbank_shape_and_coverage() -> None:
    fb = mel_filterbank(RATE, 1024, 80)
    assert fb.shape == (80, 513)
    assert (fb >= 0).all()
    assert (fb.sum(axis=1) > 0).all()
    peaks = np.argmax(fb, axis=1)
    assert (np.diff(peaks) >= 0).all()
