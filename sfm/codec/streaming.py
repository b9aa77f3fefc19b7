"""Jitted streaming front-end for the codec: encode/decode chunks of whole frames.

Each call runs one compiled pure function `step(params, state, x) -> (state, y)`; the state
is donated so buffers are updated in place. Any chunk length that is a multiple of the frame
size works (one compile per distinct length).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sfm.codec.model import Mimi
from sfm.nn.streaming import StaticModel, reset_where


# Parameters travel as a flat list of arrays: flattening an nnx.State on every call costs
# milliseconds of Python per frame, a list is flattened in C++.
@partial(jax.jit, static_argnums=(0, 4), donate_argnums=(2,))
def _encode(static: StaticModel, leaves: list, state: Any, wav: jax.Array, n_q: int) -> Any:
    return static.model(leaves).encode_step(state, wav, n_q)


@partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _decode(static: StaticModel, leaves: list, state: Any, codes: jax.Array) -> Any:
    return static.model(leaves).decode_step(state, codes)


class StreamingCodec:
    """Holds the encoder and decoder streaming states of `batch_size` independent sessions."""

    def __init__(self, model: Mimi, batch_size: int = 1, n_q: int | None = None) -> None:
        self.cfg = model.cfg
        self.n_q = n_q or model.cfg.n_q
        self.batch_size = batch_size
        # A serving copy (same arrays, new module objects) with precomputed centroids.
        serving = nnx.merge(*nnx.split(model))
        serving.freeze_codebooks()
        graphdef, params = nnx.split(serving)
        self._leaves, treedef = jax.tree.flatten(params)
        self._static = StaticModel(graphdef, treedef)
        self._fresh_encode = model.init_encode_state(batch_size)
        self._fresh_decode = model.init_decode_state(batch_size)
        self.reset()

    def reset(self, mask_b: jax.Array | None = None) -> None:
        """Restart all sessions, or only those where `mask_b` is true."""
        if mask_b is None:
            mask_b = jnp.ones((self.batch_size,), jnp.bool_)
        if not hasattr(self, "_enc_state"):
            self._enc_state = jax.tree.map(jnp.copy, self._fresh_encode)
            self._dec_state = jax.tree.map(jnp.copy, self._fresh_decode)
            return
        self._enc_state = reset_where(self._enc_state, self._fresh_encode, mask_b)
        self._dec_state = reset_where(self._dec_state, self._fresh_decode, mask_b)

    def encode_chunk(self, wav_bt: jax.Array) -> jax.Array:
        """[B, k * frame_size] audio -> [B, n_q, k] codes."""
        self._enc_state, codes = _encode(
            self._static,
            self._leaves,
            self._enc_state,
            jnp.asarray(wav_bt, jnp.float32),
            self.n_q,
        )
        return codes

    def decode_chunk(self, codes_bkt: jax.Array) -> jax.Array:
        """[B, K, k] codes -> [B, k * frame_size] audio."""
        self._dec_state, wav = _decode(
            self._static,
            self._leaves,
            self._dec_state,
            jnp.asarray(codes_bkt, jnp.int32),
        )
        return wav
