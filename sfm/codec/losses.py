"""Codec training losses: multi-scale mel reconstruction, hinge adversarial, feature
matching and semantic distillation from a frozen teacher.

The mel loss and `sfm.eval.codec_metrics.mel_distance` share one log-mel (`sfm.codec.mel`),
so the loss reads on the metric's scale.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from sfm.codec.config import MEL_SCALES
from sfm.codec.discriminator import Features, Logits
from sfm.codec.mel import log_mel

_EPS = 1e-8


# ---- reconstruction ---------------------------------------------------------------------


def mel_loss(
    real_bt: jax.Array,
    fake_bt: jax.Array,
    sample_rate: int,
    scales: Sequence[tuple[int, int]] = MEL_SCALES,
) -> jax.Array:
    """Mean over (n_fft, n_mels) scales of the L1 distance between log-mel spectrograms."""
    dists = [
        jnp.mean(jnp.abs(log_mel(real_bt, sample_rate, *s) - log_mel(fake_bt, sample_rate, *s)))
        for s in scales
    ]
    return sum(dists) / len(dists)


# ---- adversarial ------------------------------------------------------------------------


def hinge_disc_loss(real: Logits, fake: Logits) -> jax.Array:
    """Discriminator hinge loss: mean over discriminators of E[relu(1 - D(x))] +
    E[relu(1 + D(G(z)))]."""
    terms = [
        jnp.mean(jax.nn.relu(1 - r)) + jnp.mean(jax.nn.relu(1 + f)) for r, f in zip(real, fake)
    ]
    return sum(terms) / len(terms)


def hinge_gen_loss(fake: Logits) -> jax.Array:
    """Generator hinge loss: mean over discriminators of E[relu(1 - D(G(z)))]."""
    return sum(jnp.mean(jax.nn.relu(1 - f)) for f in fake) / len(fake)


def disc_accuracy(real: Logits, fake: Logits) -> jax.Array:
    """Fraction of logits on the right side of 0 (real > 0, fake < 0), mean over discriminators."""
    accs = [0.5 * (jnp.mean(r > 0) + jnp.mean(f < 0)) for r, f in zip(real, fake)]
    return sum(accs) / len(accs)


def feature_matching_loss(real: Features, fake: Features) -> jax.Array:
    """Mean over discriminators and layers of |real - fake|_1 / |real|_1 (EnCodec's relative
    feature loss); the real features are treated as constants."""
    terms = [
        jnp.mean(jnp.abs(jax.lax.stop_gradient(r) - f))
        / (jnp.mean(jnp.abs(jax.lax.stop_gradient(r))) + _EPS)
        for rs, fs in zip(real, fake)
        for r, f in zip(rs, fs)
    ]
    return sum(terms) / len(terms)


# ---- semantic distillation --------------------------------------------------------------


class Teacher(Protocol):
    """A frozen feature extractor: audio [B, T] -> features [B, frames, dim] at `frame_rate`.

    It must be traceable by jax (it runs inside the jitted train step) and is never trained.
    """

    frame_rate: float
    dim: int

    def __call__(self, wav_bt: jax.Array) -> jax.Array: ...


class MelTeacher:
    """A fixed random projection of per-utterance-normalised log-mel frames: a cheap local
    stand-in for a self-supervised speech model (tests, small runs)."""

    def __init__(
        self,
        sample_rate: int,
        frame_rate: float = 50.0,
        dim: int = 64,
        n_mels: int = 64,
        seed: int = 0,
    ) -> None:
        self.sample_rate, self.frame_rate, self.dim, self.n_mels = (
            sample_rate,
            frame_rate,
            dim,
            n_mels,
        )
        self.hop = round(sample_rate / frame_rate)
        rng = np.random.default_rng(seed)
        self.proj = (rng.standard_normal((n_mels, dim)) / np.sqrt(n_mels)).astype(np.float32)

    def __call__(self, wav_bt: jax.Array) -> jax.Array:
        mel = log_mel(wav_bt, self.sample_rate, 2 * self.hop, self.n_mels, self.hop)
        mel = mel - jnp.mean(mel, axis=1, keepdims=True)
        return mel @ jnp.asarray(self.proj)


def make_teacher(name: str, sample_rate: int, dim: int) -> Teacher | None:
    """The teacher `codec_train.teacher` names ("none": no distillation)."""
    if name == "none":
        return None
    if name == "mel":
        return MelTeacher(sample_rate, dim=dim)
    raise ValueError(f"codec_train.teacher: unknown teacher {name!r} (none or mel)")


@functools.lru_cache(maxsize=32)
def _area_weights(src: int, dst: int) -> np.ndarray:
    """[dst, src] weights of area resampling: the overlap of each source frame's span with
    each target frame's span (both tiling [0, 1)), rows normalised to sum to 1."""
    s = np.arange(src + 1) / src
    d = np.arange(dst + 1) / dst
    overlap = np.minimum(d[1:, None], s[None, 1:]) - np.maximum(d[:-1, None], s[None, :-1])
    w = np.maximum(overlap, 0.0)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def resample_frames(feats_btd: jax.Array, frames: int) -> jax.Array:
    """[B, T, D] features resampled along time to `frames` by area (box) averaging."""
    w = jnp.asarray(_area_weights(feats_btd.shape[1], frames))
    return jnp.einsum("nt,btd->bnd", w, feats_btd.astype(jnp.float32))


def distill_loss(student_btd: jax.Array, teacher_btd: jax.Array) -> jax.Array:
    """Mean cosine distance 1 - cos(student, teacher) per frame; the teacher is resampled to
    the student's frame count and is a constant."""
    teacher = jax.lax.stop_gradient(resample_frames(teacher_btd, student_btd.shape[1]))
    s = student_btd.astype(jnp.float32)
    t = teacher.astype(jnp.float32)
    cos = jnp.sum(s * t, -1) / (jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1) + _EPS)
    return jnp.mean(1.0 - cos)
