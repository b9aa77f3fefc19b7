"""Causal attention for every model in sfm: one attention function, one ring KV cache.

`attention` is softmax attention with float32 logits and grouped keys (H query heads share
G kv heads); visibility comes from positions (`causal_mask`: filled, not in the future,
within the context window). `impl` picks the implementation: "xla" (plain jnp, every backend);
"pallas" the kernels of sfm.kernels where one serves the call: `self_attention` (the
teacher-forced pass) through splash attention on TPU and cuDNN on GPU
(`sfm.kernels.attention`; the Pallas interpreter on CPU), the plain form elsewhere.

The cache is a ring of `capacity` keys and values per sequence, head-major [B, G, C, D] so it
feeds the attention products without a transpose; `pos` holds each slot's position (-1:
empty). `cached_attention` is a streaming step of any length: it attends over the cache and
the new keys and leaves the new keys in the ring, equal to attending over the whole sequence
(the ring never drops a key that a query of the step may still see).

`MultiHeadAttention` is the codec's module (Mimi: fused qkv projection, RoPE); the LM's
(per-step weights, grouped keys) is `sfm.lm.layers.Attention`. Both run on the functions here.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from sfm.kernels import attention as kernel_attention
from sfm.nn.linear import Linear
from sfm.nn.rope import apply_rope
from sfm.parallel.rules import per_batch_shard

State = dict[str, Any]
Impl = Literal["xla", "pallas"]
IMPLS: tuple[str, ...] = ("xla", "pallas")


def causal_mask(pos_bq: jax.Array, pos_bk: jax.Array, context: int | None) -> jax.Array:
    """[B, Tq, Tk]: key k is visible to query q (filled, not in the future, within context)."""
    delta = pos_bq[:, :, None] - pos_bk[:, None, :]
    mask = (pos_bk[:, None, :] >= 0) & (delta >= 0)
    return mask & (delta < context) if context is not None else mask


def attention(
    q_bqhd: jax.Array,
    k_bgkd: jax.Array,
    v_bgkd: jax.Array,
    mask_bqk: jax.Array,
    *,
    impl: Impl = "xla",
) -> jax.Array:
    """Softmax(q k^T / sqrt(D)) v over the visible keys -> [B, Tq, H * D] in v's dtype.

    q [B, Tq, H, D]; k, v [B, G, Tk, D] with G dividing H (query head h reads kv head
    h // (H / G)); logits and softmax in float32."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r}: expected one of {', '.join(IMPLS)}")
    b, q, h, d = q_bqhd.shape
    g = k_bgkd.shape[1]
    q_grouped = q_bqhd.reshape(b, q, g, h // g, d)
    logits = jnp.einsum("bqgrd,bgkd->bgrqk", q_grouped, k_bgkd).astype(jnp.float32) * d**-0.5
    logits = jnp.where(mask_bqk[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bgkd.dtype)
    return jnp.einsum("bgrqk,bgkd->bqgrd", probs, v_bgkd).reshape(b, q, h * d)


def self_attention(
    q_bthd: jax.Array,
    k_btgd: jax.Array,
    v_btgd: jax.Array,
    pos_bt: jax.Array,
    *,
    context: int | None,
    impl: Impl = "xla",
) -> jax.Array:
    """Teacher-forced causal attention of a sequence over itself -> [B, T, H * D]; k and v
    [B, T, G, D]. With impl "pallas" a kernel runs where one suits the platform and shapes
    (`sfm.kernels.attention`); it reads the positions as 0..T-1, as every teacher-forced
    pass lays them out."""
    t, d = q_bthd.shape[1], q_bthd.shape[-1]
    if impl == "xla" or not kernel_attention.any_kernel(t, d, q_bthd.dtype):
        mask = causal_mask(pos_bt, pos_bt, context)
        return attention(q_bthd, heads_first(k_btgd), heads_first(v_btgd), mask)

    def reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:  # per batch shard
        pos = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
        return attention(q, heads_first(k), heads_first(v), causal_mask(pos, pos, context))

    kernel = partial(kernel_attention.self_attention, context=context, fallback=reference)
    return per_batch_shard(kernel, (q_bthd, k_btgd, v_btgd), (0, 0, 0), 0)


def init_cache(batch: int, capacity: int, kv_heads: int, head_dim: int, dtype: Any) -> State:
    """An empty ring: keys and values [B, G, capacity, D], positions [B, capacity] of -1."""
    shape = (batch, kv_heads, capacity, head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "pos": jnp.full((batch, capacity), -1, jnp.int32),
    }


def write_cache(cache: State, k_btgd: jax.Array, v_btgd: jax.Array, pos_bt: jax.Array) -> State:
    """The ring with keys and values [B, T, G, D] written at slots pos % capacity (only the
    newest `capacity` of them when T exceeds it)."""
    capacity = cache["pos"].shape[1]
    if pos_bt.shape[1] >= capacity:
        k_btgd, v_btgd, pos_bt = k_btgd[:, -capacity:], v_btgd[:, -capacity:], pos_bt[:, -capacity:]
    slots = pos_bt % capacity
    rows = jnp.arange(pos_bt.shape[0])[:, None]
    # Advanced indices around a slice: the update is laid out [B, T, G, D], as k and v are.
    return {
        "k": cache["k"].at[rows, :, slots].set(k_btgd.astype(cache["k"].dtype)),
        "v": cache["v"].at[rows, :, slots].set(v_btgd.astype(cache["v"].dtype)),
        "pos": cache["pos"].at[rows, slots].set(pos_bt),
    }


def heads_first(x_btgd: jax.Array) -> jax.Array:
    """[B, T, G, D] -> [B, G, T, D]."""
    return jnp.swapaxes(x_btgd, 1, 2)


def cached_attention(
    cache: State,
    q_bqhd: jax.Array,
    k_btgd: jax.Array,
    v_btgd: jax.Array,
    pos_bt: jax.Array,
    *,
    context: int | None,
    impl: Impl = "xla",
) -> tuple[State, jax.Array]:
    """One streaming step: attention of the new queries over the cache and the new keys, and
    the cache with the new keys written; (cache, [B, T, H * D]).

    When the ring has T - 1 slots beyond the context, writing first cannot evict a key that
    a new query sees: the step writes in place and attends over the ring alone (no copy of
    the cache). Otherwise it attends over the old ring and the new keys side by side. Without
    a context window every key stays visible, so the ring must hold the whole sequence."""
    capacity, t = cache["pos"].shape[1], pos_bt.shape[1]
    if context is None or t <= capacity - context + 1:
        cache = write_cache(cache, k_btgd, v_btgd, pos_bt)
        k, v, pos_k = cache["k"], cache["v"], cache["pos"]
    else:
        k = jnp.concatenate([cache["k"].astype(k_btgd.dtype), heads_first(k_btgd)], axis=2)
        v = jnp.concatenate([cache["v"].astype(v_btgd.dtype), heads_first(v_btgd)], axis=2)
        pos_k = jnp.concatenate([cache["pos"], pos_bt], axis=1)
        cache = write_cache(cache, k_btgd, v_btgd, pos_bt)
    mask = causal_mask(pos_bt, pos_k, context)
    out = attention(q_bqhd, k.astype(q_bqhd.dtype), v.astype(q_bqhd.dtype), mask, impl=impl)
    return cache, out


class MultiHeadAttention(nnx.Module):
    """Fused qkv projection [embed, 3 * embed] -> attention -> out projection (Mimi's)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        context: int | None,
        max_period: float | None = 10000.0,
        param_dtype: str = "float32",
        impl: Impl = "xla",
        rngs: nnx.Rngs,
    ) -> None:
        self.dim, self.num_heads = dim, num_heads
        self.context, self.max_period, self.impl = context, max_period, impl
        self.in_proj = Linear(
            dim, 3 * dim, axes=("embed", "qkv"), param_dtype=param_dtype, rngs=rngs
        )
        self.out_proj = Linear(dim, dim, axes=("qkv", "embed"), param_dtype=param_dtype, rngs=rngs)

    def init_state(self, batch: int, capacity: int, dtype: Any = jnp.float32) -> State:
        """A ring of `capacity` keys and values (see `init_cache`)."""
        return init_cache(batch, capacity, self.num_heads, self.dim // self.num_heads, dtype)

    def _qkv(self, x_btd: jax.Array, pos_bt: jax.Array) -> tuple[jax.Array, ...]:
        b, t, _ = x_btd.shape
        qkv = self.in_proj(x_btd).reshape(b, t, 3, self.num_heads, self.dim // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.max_period is not None:
            q, k = apply_rope(q, k, pos_bt, self.max_period)
        return q, k, v

    def __call__(self, x_btd: jax.Array, pos_bt: jax.Array) -> jax.Array:
        q, k, v = self._qkv(x_btd, pos_bt)
        mask = causal_mask(pos_bt, pos_bt, self.context)
        out = attention(q, heads_first(k), heads_first(v), mask, impl=self.impl)
        return self.out_proj(out)

    def step(self, state: State, x_btd: jax.Array, pos_bt: jax.Array) -> tuple[State, jax.Array]:
        """Attend over the cache and the new keys; the cache gains the new keys."""
        q, k, v = self._qkv(x_btd, pos_bt)
        state, out = cached_attention(state, q, k, v, pos_bt, context=self.context, impl=self.impl)
        return state, self.out_proj(out)
