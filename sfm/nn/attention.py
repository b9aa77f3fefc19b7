"""Causal multi-head self-attention with RoPE, a context window and a ring KV cache.

Streaming attends over the cache and the new keys (one softmax over both) before writing
the new keys into the ring, so a step of any length equals the offline computation exactly
(the cache never drops a key that a query of the current step may still see).
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
        """Ring buffer of `capacity` keys/values, head-major [B, H, capacity, D] so the cache
        feeds the attention products without a transpose; `pos` holds each slot's position
        (-1: empty)."""
        hd = self.dim // self.num_heads
        return {
            "k": jnp.zeros((batch, self.num_heads, capacity, hd), dtype),
            "v": jnp.zeros((batch, self.num_heads, capacity, hd), dtype),
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
        self, q_bqhd: jax.Array, pos_bq: jax.Array, parts: list[tuple[jax.Array, ...]]
    ) -> jax.Array:
        """Softmax attention over the union of key sets `parts`, each (k_bhkd, v_bhkd, pos_bk)."""
        scale = q_bqhd.shape[-1] ** -0.5
        logits = []
        for k, _, pos_k in parts:
            delta = pos_bq[:, :, None] - pos_k[:, None, :]  # [B, Tq, Tk]
            mask = (pos_k[:, None, :] >= 0) & (delta >= 0)
            if self.context is not None:
                mask &= delta < self.context
            lg = jnp.einsum("bqhd,bhkd->bhqk", q_bqhd, k).astype(jnp.float32) * scale
            logits.append(jnp.where(mask[:, None], lg, jnp.finfo(jnp.float32).min))
        probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
        out, start = 0.0, 0
        for k, v, _ in parts:
            p = probs[..., start : start + k.shape[2]].astype(v.dtype)
            out = out + jnp.einsum("bhqk,bhkd->bqhd", p, v)
            start += k.shape[2]
        return self.out_proj(out.reshape(*q_bqhd.shape[:2], self.dim))

    def __call__(self, x_btd: jax.Array, pos_bt: jax.Array) -> jax.Array:
        q, k, v = self._qkv(x_btd, pos_bt)
        return self._attend(q, pos_bt, [(_heads_first(k), _heads_first(v), pos_bt)])

    def step(self, state: State, x_btd: jax.Array, pos_bt: jax.Array) -> tuple[State, jax.Array]:
        """Attend over the cache and the new keys (two key sets, one softmax), then write.

        When the ring has `t - 1` slots beyond the context, writing first cannot evict a key
        that a new query sees, so the step writes in place and attends over the ring alone
        (no copy of the cache).
        """
        q, k, v = self._qkv(x_btd, pos_bt)
        capacity, t = state["pos"].shape[1], x_btd.shape[1]
        if self.context is not None and t <= capacity - self.context + 1:
            state = self._write(state, k, v, pos_bt)
            ring = (state["k"].astype(k.dtype), state["v"].astype(v.dtype), state["pos"])
            return state, self._attend(q, pos_bt, [ring])
        cache = (state["k"].astype(k.dtype), state["v"].astype(v.dtype), state["pos"])
        y = self._attend(q, pos_bt, [cache, (_heads_first(k), _heads_first(v), pos_bt)])
        return self._write(state, k, v, pos_bt), y

    @staticmethod
    def _write(state: State, k: jax.Array, v: jax.Array, pos_bt: jax.Array) -> State:
        capacity = state["pos"].shape[1]
        t = pos_bt.shape[1]
        if t >= capacity:  # only the newest `capacity` entries survive
            k, v, pos_bt = k[:, -capacity:], v[:, -capacity:], pos_bt[:, -capacity:]
        slots = pos_bt % capacity  # [B, T]
        batch = jnp.arange(pos_bt.shape[0])[:, None]
        # Advanced indices around a slice: the update is laid out [B, T, H, D], as k and v are.
        return {
            "k": state["k"].at[batch, :, slots].set(k.astype(state["k"].dtype)),
            "v": state["v"].at[batch, :, slots].set(v.astype(state["v"].dtype)),
            "pos": state["pos"].at[batch, slots].set(pos_bt),
        }


def _heads_first(x_bthd: jax.Array) -> jax.Array:
    return jnp.swapaxes(x_bthd, 1, 2)
