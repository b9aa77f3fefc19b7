"""`sfm.kernels.sampling` for a Mosaic GPU kernel: the same draws, read column-wise from
logits stored as [vocabulary, batch] tiles.

The GPU depth kernel keeps activations feature-major (a batch column per sequence), so a
position's logits are [Vp, Bt] (the vocabulary padded to whole 64-row tiles, in shared or
global memory: the caller's `load(t)` reads tile t) and every per-sequence quantity is a
[Bt] vector. A Hopper warpgroup cannot hold a whole [V, Bt] block in registers, so each
reduction of `sampling` (max, min, the counts of the two bisections, the first lane
holding a maximum) is a loop over 64-row tiles. The arithmetic is `sampling`'s, step for
step (the same hash of (seed, position, vocabulary index), the same bisection midpoints,
counts exact in float32), so on the same logits the tokens equal the reference's (up to
the log in the Gumbel noise, evaluated by the backend). Rows at or past the true
vocabulary size are never drawn.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from sfm.kernels.sampling import _BISECTIONS, _lowbias32

ROWS = 64  # vocabulary rows per tile


def _column(v_b: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """[Bt] -> [rows, Bt]: one value per batch column."""
    return lax.broadcast_in_dim(v_b, shape, (1,))


Load = Callable[[jax.Array], jax.Array]


class Columns:
    """Column-wise reductions over [tiles * 64, width] logits read by `load(t)` (tile t as
    [64, width] float32), the first `vocab` rows valid."""

    def __init__(self, load: Load, tiles: int, width: int, vocab: int) -> None:
        self.load, self.tiles, self.width, self.vocab = load, tiles, width, vocab
        self.shape = (ROWS, width)

    def tile(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Tile t's logits [64, Bt] float32 and their vocabulary indices (int32)."""
        x = self.load(t)
        index = lax.broadcasted_iota(jnp.int32, self.shape, 0) + t * ROWS
        return x, index

    def reduce(
        self,
        fn: Callable[[jax.Array, jax.Array], jax.Array],
        combine: Callable[[jax.Array, jax.Array], jax.Array],
        init: float,
    ) -> jax.Array:
        """combine over tiles of the column reductions fn(x, index) -> [Bt] float32."""

        def step(t: jax.Array, acc: jax.Array) -> jax.Array:
            return combine(acc, fn(*self.tile(t)))

        return lax.fori_loop(0, self.tiles, step, jnp.full((self.width,), init, jnp.float32))

    def max(self, select: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
        return self.reduce(lambda x, i: jnp.max(select(x, i), axis=0), jnp.maximum, -jnp.inf)

    def min(self, select: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
        return self.reduce(lambda x, i: jnp.min(select(x, i), axis=0), jnp.minimum, jnp.inf)

    def count(self, mask: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
        def fn(x: jax.Array, i: jax.Array) -> jax.Array:
            return jnp.sum((mask(x, i) & (i < self.vocab)).astype(jnp.float32), axis=0)

        return self.reduce(fn, jnp.add, 0.0)

    def argmax(self, value: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
        """[Bt] int32: the first vocabulary index holding each column's maximum of value."""
        valid = self._valid(value)
        best = self.max(valid)
        first = self.min(
            lambda x, i: jnp.where(
                valid(x, i) == _column(best, self.shape), i.astype(jnp.float32), float(self.vocab)
            )
        )
        return jnp.minimum(first, float(self.vocab - 1)).astype(jnp.int32)

    def _valid(
        self, value: Callable[[jax.Array, jax.Array], jax.Array]
    ) -> Callable[[jax.Array, jax.Array], jax.Array]:
        return lambda x, i: jnp.where(i < self.vocab, value(x, i), -jnp.inf)


def uniform(
    seed_a: jax.Array, seed_b: jax.Array, position: jax.Array, index_vb: jax.Array
) -> jax.Array:
    """`sampling.uniform` at vocabulary indices index_vb [rows, Bt] for seeds [Bt]."""
    row = _lowbias32(seed_a ^ _lowbias32(seed_b + jnp.int32(0x9E3779B9 - (1 << 32)) * position))
    row = _column(row, index_vb.shape)
    bits = _lowbias32(_lowbias32(index_vb ^ row) + row)
    mantissa = lax.shift_right_logical(bits, jnp.int32(8)).astype(jnp.float32)
    return (mantissa + 0.5) * (1.0 / (1 << 24))


def sample_columns(
    load: Load,
    tiles: int,
    width: int,
    vocab: int,
    seed_a: jax.Array,
    seed_b: jax.Array,
    position: jax.Array,
    temp_b: jax.Array,
    top_k_b: jax.Array,
    *,
    greedy: bool,
) -> jax.Array:
    """One token per batch column [width] int32: `sampling.sample_rows` on the columns of
    the logits (`tiles` tiles of 64 rows read by `load`, the first `vocab` rows valid),
    seeds / temperatures / top-k as [width] vectors."""
    cols = Columns(load, tiles, width, vocab)
    shape = cols.shape
    plain = cols.argmax(lambda x, i: x)
    if greedy:
        return plain
    # top-k: bisection on the value, then on the index among the ties (`top_k_mask`).
    lo = cols.min(lambda x, i: jnp.where(i < vocab, x, jnp.inf))
    hi = cols.max(lambda x, i: jnp.where(i < vocab, x, -jnp.inf))
    k = top_k_b.astype(jnp.float32)

    def halve(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds
        mid = lo + (hi - lo) * 0.5
        enough = cols.count(lambda x, i: x >= _column(mid, shape)) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = lax.fori_loop(0, _BISECTIONS, halve, (lo, hi))
    kth = cols.min(lambda x, i: jnp.where((x >= _column(lo, shape)) & (i < vocab), x, jnp.inf))
    wanted = k - cols.count(lambda x, i: x > _column(kth, shape))

    def narrow(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds  # keep the tied logits at indices < hi; lo keeps too few
        mid = lax.shift_right_logical(lo + hi, jnp.int32(1))  # floor((lo + hi) / 2)
        tied_below = cols.count(lambda x, i: (x == _column(kth, shape)) & (i < _column(mid, shape)))
        enough = tied_below >= wanted
        return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

    start = (jnp.zeros(kth.shape, jnp.int32), jnp.full(kth.shape, vocab, jnp.int32))
    _, end = lax.fori_loop(0, max(1, vocab.bit_length()), narrow, start)

    def scaled(x: jax.Array, i: jax.Array) -> jax.Array:
        keep = (x > _column(kth, shape)) | ((x == _column(kth, shape)) & (i < _column(end, shape)))
        u = uniform(seed_a, seed_b, position, i)
        gumbel = -jnp.log(-jnp.log(u))
        value = x / _column(jnp.where(temp_b > 0, temp_b, 1.0), shape) + gumbel
        return jnp.where(keep, value, -jnp.inf)

    drawn = cols.argmax(scaled)
    return jnp.where(temp_b > 0, drawn, plain)


__all__ = ["ROWS", "sample_columns", "uniform"]
