"""Rotary position embeddings (interleaved real/imaginary pairs, as Moshi)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def apply_rope(
    q_bthd: jax.Array, k_bthd: jax.Array, pos_bt: jax.Array, max_period: float
) -> tuple[jax.Array, jax.Array]:
    """Rotate adjacent channel pairs of q and k by angle pos * max_period^(-2i/D)."""
    d = q_bthd.shape[-1]
    freqs = jnp.exp(jnp.arange(d // 2, dtype=jnp.float32) * (-math.log(max_period) * 2 / d))
    angles = pos_bt.astype(jnp.float32)[:, :, None, None] * freqs
    cos, sin = jnp.cos(angles), jnp.sin(angles)

    def rotate(x: jax.Array) -> jax.Array:
        pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], d // 2, 2)
        re, im = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
        return out.reshape(x.shape).astype(x.dtype)

    return rotate(q_bthd), rotate(k_bthd)
