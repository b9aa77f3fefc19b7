"""Causal multi-head self-attention with RoPE, a context window and a ring KV cache.

Streaming attends over [cache ; new keys] before writing the new keys into the ring, so a
step of any length equals the offline computation exactly (the cache never drops a key that
a query of the current step may still see).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sfm.nn.linear import Linear
from sfm.nn.rope import apply_rope

State = dict[str, Any]


class MultiHeadAttention(nnx.Module):
    """Fused qkv projection [embed, 3 * embed] -> attention -> out projection."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        context: int | None,
        max_period: float | None = 10000.0,
        param_dtype: str = "float32",
        rngs: nnx.Rngs,
    ) -> None:
        self.dim, self.num_heads = dim, num_heads
        self.context, self.max_period = context, max_period
        self.in_proj = Linear(
            dim, 3 * dim, axes=("embed", "qkv"), param_dtype=param_dtype, rngs=rngs
        )
        self.out_proj = Linear(dim, dim, axes=("qkv", "embed"), param_dtype=param_dtype, rngs=rngs)

    def init_state(self, batch: int, capacity: int, dtype: Any = jnp.float32) -> State:
        """Ring buffer of `capacity` keys/values; `pos` holds each slot's position (-1: empty)."""
        hd = self.dim // self.num_heads
        return {
            "k": jnp.zeros((batch, capacity, self.num_heads, hd), dtype),
            "v": jnp.zeros((batch, capacity, self.num_heads, hd), dtype),
            "pos": jnp.full((batch, capacity), -1, jnp.int32),
        }

    def _qkv(self, x_btd: jax.Array, pos_bt: jax.Array) -> tuple[jax.Array, ...]:
        b, t, _ = x_btd.shape
        qkv = self.in_proj(x_btd).reshape(b, t, 3, self.num_heads, self.dim // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.max_period is not None:
            q, k = apply_rope(q, k, pos_bt, self.max_period)
        return q, k, v

    def _attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, pos_q: jax.Array, pos_k: jax.Array
    ) -> jax.Array:
        delta = pos_q[:, :, None] - pos_k[:, None, :]  # [B, Tq, Tk]
        mask = (pos_k[:, None, :] >= 0) & (delta >= 0)
        if self.context is not None:
            mask &= delta < self.context
        scale = (q.shape[-1]) ** -0.5
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
        logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return self.out_proj(out.reshape(*out.shape[:2], self.dim))

    def __call__(self, x_btd: jax.Array, pos_bt: jax.Array) -> jax.Array:
        q, k, v = self._qkv(x_btd, pos_bt)
        return self._attend(q, k, v, pos_bt, pos_bt)

    def step(self, state: State, x_btd: jax.Array, pos_bt: jax.Array) -> tuple[State, jax.Array]:
        q, k, v = self._qkv(x_btd, pos_bt)
        keys = jnp.concatenate([state["k"].astype(k.dtype), k], axis=1)
        values = jnp.concatenate([state["v"].astype(v.dtype), v], axis=1)
        pos_k = jnp.concatenate([state["pos"], pos_bt], axis=1)
        y = self._attend(q, keys, values, pos_bt, pos_k)
        return self._write(state, k, v, pos_bt), y

    @staticmethod
    def _write(state: State, k: jax.Array, v: jax.Array, pos_bt: jax.Array) -> State:
        capacity = state["pos"].shape[1]
        t = pos_bt.shape[1]
        if t >= capacity:  # only the newest `capacity` entries survive
            k, v, pos_bt = k[:, -capacity:], v[:, -capacity:], pos_bt[:, -capacity:]
        slots = pos_bt % capacity  # [B, T]
        batch = jnp.arange(pos_bt.shape[0])[:, None]
        return {
            "k": state["k"].at[batch, slots].set(k.astype(state["k"].dtype)),
            "v": state["v"].at[batch, slots].set(v.astype(state["v"].dtype)),
            "pos": state["pos"].at[batch, slots].set(pos_bt),
        }
