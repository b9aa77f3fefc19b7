"""Token sampling written for the inside of a kernel: greedy, and temperature + top-k drawn
with counter-based random bits, in plain jnp ops on a [rows, V] block of logits.

A kernel cannot call `jax.random` (nor sort, nor `lax.top_k`), so the draw is built from
what every backend lowers: integer hashing, lane reductions and a bisection.

- Random bits: a 32-bit integer hash (two rounds of Wellons' "lowbias32") of the row's seed
  pair, the position of the step and the lane. The same (seed, position) gives the same
  draw in the kernel and in its reference, so their sampled tokens can be compared exactly.
- Top-k: the k-th largest logit of each row is found by bisection on the value (32 halvings
  of the row's range), and which of the logits tied with it to keep (bfloat16 logits tie
  often) by a bisection on the lane: exactly k are kept, the lower lanes first among ties,
  as `lax.top_k` keeps them.
- Temperature: the Gumbel-max draw argmax(logits / temp + g), g = -log(-log(u)), is a
  sample of softmax(logits / temp) over the kept logits. temp <= 0 is argmax.

Argmax itself is max + the smallest lane holding it (the first maximum, as `jnp.argmax`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)  # the multiplier as int32 (the product wraps the same way)
_BISECTIONS = 32


def _lowbias32(x: jax.Array) -> jax.Array:
    """Wellons' lowbias32 integer hash on int32 bit patterns (logical shifts, wrapping
    multiplies): a bijection of 32-bit words with good avalanche."""
    x = x ^ jax.lax.shift_right_logical(x, jnp.int32(16))
    x = x * jnp.int32(_MUL1)
    x = x ^ jax.lax.shift_right_logical(x, jnp.int32(15))
    x = x * jnp.int32(_MUL2)
    return x ^ jax.lax.shift_right_logical(x, jnp.int32(16))


def uniform(seed_a: jax.Array, seed_b: jax.Array, position: jax.Array, width: int) -> jax.Array:
    """[rows, width] uniforms in (0, 1) for seeds [rows, 1] (int32) at step `position`."""
    row = _lowbias32(seed_a ^ _lowbias32(seed_b + jnp.int32(0x9E3779B9 - (1 << 32)) * position))
    lane = jax.lax.broadcasted_iota(jnp.int32, (seed_a.shape[0], width), 1)
    bits = _lowbias32(_lowbias32(lane ^ row) + row)
    mantissa = jax.lax.shift_right_logical(bits, jnp.int32(8)).astype(jnp.float32)
    return (mantissa + 0.5) * (1.0 / (1 << 24))


def argmax(x_rv: jax.Array) -> jax.Array:
    """[rows, 1] int32: the first lane holding each row's maximum (lane numbers are reduced
    as float32, exact below 2^24: kernels reduce floats on every backend)."""
    best = jnp.max(x_rv, axis=-1, keepdims=True)
    lane = jax.lax.broadcasted_iota(jnp.int32, x_rv.shape, 1).astype(jnp.float32)
    first = jnp.min(jnp.where(x_rv == best, lane, float(x_rv.shape[-1])), axis=-1, keepdims=True)
    return jnp.minimum(first, float(x_rv.shape[-1] - 1)).astype(jnp.int32)  # NaN rows: last


def top_k_mask(logits_rv: jax.Array, k_r1: jax.Array) -> jax.Array:
    """[rows, V] bool: the k largest logits of each row, ties broken towards the lower
    lane (as `lax.top_k`). Two bisections: on the value (32 halvings of the row's range
    find t, the k-th largest), then on the lane (which of the logits equal to t to keep)."""
    lo = jnp.min(logits_rv, axis=-1, keepdims=True)
    hi = jnp.max(logits_rv, axis=-1, keepdims=True)
    k = k_r1.astype(jnp.float32)

    def count(mask: jax.Array) -> jax.Array:
        return jnp.sum(mask.astype(jnp.float32), axis=-1, keepdims=True)

    def halve(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds
        mid = lo + (hi - lo) * 0.5
        enough = count(logits_rv >= mid) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, _BISECTIONS, halve, (lo, hi))
    kth = jnp.min(jnp.where(logits_rv >= lo, logits_rv, jnp.inf), axis=-1, keepdims=True)
    above, tied = logits_rv > kth, logits_rv == kth
    wanted = k - count(above)  # >= 1 of the tied logits
    lane = jax.lax.broadcasted_iota(jnp.int32, logits_rv.shape, 1).astype(jnp.float32)

    def narrow(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds  # keep the tied logits at lanes < hi; lo keeps too few
        mid = jnp.floor((lo + hi) * 0.5)
        enough = count(tied & (lane < mid)) >= wanted
        return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

    width = logits_rv.shape[-1]
    bounds = (jnp.zeros_like(kth), jnp.full_like(kth, float(width)))
    _, end = jax.lax.fori_loop(0, max(1, width.bit_length()), narrow, bounds)
    return above | (tied & (lane < end))


def sample_rows(
    logits_rv: jax.Array,
    seeds_r2: jax.Array,
    position: jax.Array | int,
    temp_r1: jax.Array,
    top_k_r1: jax.Array,
    *,
    greedy: bool,
) -> jax.Array:
    """One token per row [rows, 1] int32 from logits [rows, V] (float32).

    seeds [rows, 2] int32 (a row's random stream; `position` picks the draw within it);
    temp [rows, 1] (<= 0: argmax); top_k [rows, 1] int32 in [1, V] (V: no truncation)."""
    if greedy:
        return argmax(logits_rv)
    width = logits_rv.shape[-1]
    keep = top_k_mask(logits_rv, top_k_r1)
    u = uniform(seeds_r2[:, 0:1], seeds_r2[:, 1:2], jnp.int32(position), width)
    gumbel = -jnp.log(-jnp.log(u))
    scaled = logits_rv / jnp.where(temp_r1 > 0, temp_r1, 1.0) + gumbel
    drawn = argmax(jnp.where(keep, scaled, -jnp.inf))
    return jnp.where(temp_r1 > 0, drawn, argmax(logits_rv))


def effective_top_k(top_k_b: jax.Array, cap: int, vocab: int) -> jax.Array:
    """[B, 1] int32 in [1, vocab], as `sfm.lm.generate.sample` reads a session's top-k under
    the engine's `cap`: with 0 < cap < vocab, the session's where 0 < top_k < cap, else cap;
    a cap of 0 (or >= vocab) samples the whole vocabulary whatever the session asks."""
    k = jnp.asarray(top_k_b, jnp.int32).reshape(-1, 1)
    if cap <= 0 or cap >= vocab:
        return jnp.full_like(k, vocab)
    return jnp.where((k > 0) & (k < cap), k, cap)


def seeds_of(keys_b: jax.Array) -> jax.Array:
    """[B, 2] int32 seeds from typed PRNG keys [B] (their first two key words)."""
    data = jax.random.key_data(keys_b).reshape(keys_b.shape[0], -1)
    return jax.lax.bitcast_convert_type(data[:, :2], jnp.int32)


__all__ = ["argmax", "effective_top_k", "sample_rows", "seeds_of", "top_k_mask", "uniform"]
