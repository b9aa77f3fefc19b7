"""The codec's log-mel spectrogram, one definition for the training losses and the metrics.

HTK-mel triangular filters (Slaney area normalisation) over a periodic-Hann STFT with centred
frames, log10 floored at LOG_FLOOR. Scales are (window, bands) pairs with a quarter-window hop
(`MEL_SCALES` in the codec config).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

LOG_FLOOR = 1e-5


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


def _frames(wav_bt: jax.Array, n_fft: int, hop: int) -> jax.Array:
    """[B, T] -> [B, frames, n_fft] windows every `hop` samples (n_fft a multiple of hop)."""
    if n_fft % hop:
        raise ValueError(f"stft: n_fft {n_fft} is not a multiple of the hop {hop}")
    r, b = n_fft // hop, wav_bt.shape[0]
    n = max(1 + (wav_bt.shape[1] - n_fft) // hop, 1)
    wav_bt = jnp.pad(wav_bt, ((0, 0), (0, max((n + r - 1) * hop - wav_bt.shape[1], 0))))
    blocks = wav_bt[:, : (n + r - 1) * hop].reshape(b, n + r - 1, hop)
    return jnp.concatenate([blocks[:, i : i + n] for i in range(r)], axis=-1)


def hann(n: int) -> jax.Array:
    """Periodic Hann window."""
    return 0.5 - 0.5 * jnp.cos(2.0 * jnp.pi * jnp.arange(n) / n)


def stft(wav_bt: jax.Array, n_fft: int, hop: int, center: bool = True) -> jax.Array:
    """Complex STFT [B, frames, n_fft // 2 + 1] with a periodic Hann window; `center` pads
    n_fft // 2 zeros on both sides (frame i is centred on sample i * hop)."""
    if center:
        wav_bt = jnp.pad(wav_bt, ((0, 0), (n_fft // 2, n_fft // 2)))
    return jnp.fft.rfft(_frames(wav_bt, n_fft, hop) * hann(n_fft), axis=-1)


def log_mel(
    wav_bt: jax.Array, sample_rate: int, n_fft: int, n_mels: int, hop: int | None = None
) -> jax.Array:
    """log10 mel magnitude [B, frames, n_mels] (centred frames, hop n_fft // 4 by default)."""
    spec = stft(wav_bt, n_fft, hop or n_fft // 4)
    mag = jnp.sqrt(jnp.square(spec.real) + jnp.square(spec.imag) + 1e-12)  # finite gradient at 0
    fb = jnp.asarray(mel_filterbank(sample_rate, n_fft, n_mels).T, jnp.float32)
    return jnp.log10(jnp.maximum(mag @ fb, LOG_FLOOR))
