"""Codec quality metrics of numpy signals: scale-invariant SDR and multi-scale log-mel L1."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sfm.codec.config import MEL_SCALES
from sfm.codec.mel import log_mel

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


def mel_distance(ref: np.ndarray, est: np.ndarray, sample_rate: int) -> float:
    """Mean over MEL_SCALES of the L1 distance between the codec's log-mel spectrograms
    (`sfm.codec.mel.log_mel`, the training loss's own), 0 for identical signals."""
    ref, est = _common(ref, est)
    pair = jnp.asarray(np.stack([ref, est]), jnp.float32)
    dists = []
    for n_fft, n_mels in MEL_SCALES:
        mel = log_mel(pair, sample_rate, n_fft, n_mels)
        dists.append(float(jnp.mean(jnp.abs(mel[0] - mel[1]))))
    return float(np.mean(dists))
