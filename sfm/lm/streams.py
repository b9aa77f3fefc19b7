"""The LM's stream layout, seen from the model: [text, K model codebooks, K user codebooks].

The layout itself (delays, record -> streams, interleaving, loss masks) lives in
`sfm.data.layout`, and the inner-monologue text stream built from word timestamps in
`sfm.data.text_stream`; both are re-exported here. This module adds the batched JAX forms
the model and the sampler use: delay/undelay of [B, S, T] arrays with Moshi's convention
(same length T; a delayed stream starts with the initial token).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from sfm.data.layout import (
    IGNORE,
    INITIAL,
    StreamLayout,
    apply_delays,
    delay_streams,
    interleave,
    moshi_delays,
    to_streams,
    undo_delays,
)
from sfm.data.text_stream import TEXT_EPAD, TEXT_PAD, place_words
from sfm.lm.config import LMConfig


def layout_of(cfg: LMConfig) -> StreamLayout:
    """The data layout matching an LM config (streams, delays, pad ids)."""
    return StreamLayout(
        n_q=cfg.n_q, delays=cfg.delays, text_pad=cfg.text_pad, text_epad=cfg.text_epad
    )


def delay(codes_bst: jax.Array, delays: Sequence[int], fill: int = INITIAL) -> jax.Array:
    """Shift stream s right by delays[s] frames, keeping length T; the first frames get fill."""
    t = codes_bst.shape[2]
    out = []
    for s, d in enumerate(delays):
        row = codes_bst[:, s]
        if d:
            row = jnp.concatenate([jnp.full_like(row[:, :d], fill), row[:, : t - d]], axis=1)
        out.append(row)
    return jnp.stack(out, axis=1)


def undelay(x_bst: jax.Array, delays: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Inverse of `delay` on any [B, S, T, ...] array: (values, valid [B, S, T]).

    Frame t of stream s is read from delayed frame t + delays[s]; the last delays[s] frames
    have no source and are marked invalid (their values are zeros)."""
    b, _, t = x_bst.shape[:3]
    vals, valid = [], []
    for s, d in enumerate(delays):
        row = x_bst[:, s]
        if d:
            row = jnp.concatenate([row[:, d:], jnp.zeros_like(row[:, :d])], axis=1)
        vals.append(row)
        valid.append(jnp.arange(t) < t - d)
    mask = jnp.broadcast_to(jnp.stack(valid)[None], (b, len(delays), t))
    return jnp.stack(vals, axis=1), mask


__all__ = [
    "IGNORE",
    "INITIAL",
    "TEXT_EPAD",
    "TEXT_PAD",
    "StreamLayout",
    "apply_delays",
    "delay",
    "delay_streams",
    "interleave",
    "layout_of",
    "moshi_delays",
    "place_words",
    "to_streams",
    "undelay",
    "undo_delays",
]
