"""Codec quality metrics on numpy signals: scale-invariant SDR and multi-scale log-mel L1."""

from __future__ import annotations

import functools

import numpy as np

# (window size, mel bands) per scale; the hop is a quarter window.
MEL_SCALES: tuple[tuple[int, int], ...] = ((512, 64), (1024, 80), (2048, 128))
LOG_FLOOR = 1e-5
_EPS = 1e-12


def _common(ref: np.ndarray, est: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten both signals to float64 and trim them to their common length."""
    ref = np.asarray(ref, dtype=np.float64).reshape(-1)
    est = np.asarray(est, dtype=np.float64).reshape(-1)
    n = min(ref.size, est.size)
    if n == 0:
        raise ValueError("codec metric: both signals must be non-empty")
    return ref[:n], est[:n]


def si_sdr(ref: np.ndarray, est: np.ndarray) -> float:
    """Scale-invariant signal-to-distortion ratio in dB of `est` against `ref` (zero-mean)."""
    ref, est = _common(ref, est)
    ref = ref - ref.mean()
    est = est - est.mean()
    alpha = np.dot(est, ref) / (np.dot(ref, ref) + _EPS)
    target = alpha * ref
    noise = est - target
    return float(10.0 * np.log10((np.dot(target, target) + _EPS) / (np.dot(noise, noise) + _EPS)))


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of `hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=16)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular HTK-mel filters [n_mels, n_fft//2+1], area-normalised (Slaney), 0..Nyquist."""
    fft_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges_hz = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2.0), n_mels + 2))
    lo, mid, hi = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (fft_hz[None] - lo) / (mid - lo)
    falling = (hi - fft_hz[None]) / (hi - mid)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= 2.0 / (hi - lo)
    return weights


def stft_magnitude(wav: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Magnitude STFT [frames, n_fft//2+1] with a periodic Hann window and centred frames."""
    padded = np.pad(wav, (n_fft // 2, n_fft // 2))
    if padded.size < n_fft:
        padded = np.pad(padded, (0, n_fft - padded.size))
    n_frames = 1 + (padded.size - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
    return np.abs(np.fft.rfft(padded[idx] * window, axis=-1))


def log_mel(wav: np.ndarray, sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """log10 mel magnitude spectrogram [frames, n_mels], floored at LOG_FLOOR."""
    mag = stft_magnitude(wav, n_fft, n_fft // 4)
    mel = mag @ mel_filterbank(sample_rate, n_fft, n_mels).T
    return np.log10(np.maximum(mel, LOG_FLOOR))


def mel_distance(ref: np.ndarray, est: np.ndarray, sample_rate: int) -> float:
    """Mean over MEL_SCALES of the L1 distance between log-mel spectrograms (0 = identical)."""
    ref, est = _common(ref, est)
    dists = [
        float(
            np.mean(
                np.abs(
                    log_mel(ref, sample_rate, n_fft, n_mels)
                    - log_mel(est, sample_rate, n_fft, n_mels)
                )
            )
        )
        for n_fft, n_mels in MEL_SCALES
    ]
    return float(np.mean(dists))
