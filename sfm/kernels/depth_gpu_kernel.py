"""The body of the Mosaic GPU depth-frame kernel and its tile helpers (the design, the
wrapper and the dispatch conditions are in `sfm.kernels.depth_gpu`).

Ordering: every TMA store is waited for (`wait_smem_to_gmem(0)`) before anything copies the
buffer back, and the body relies on Pallas's automatic warpgroup barriers around shared
memory stores and before each TMA load into a reused tile (the kernel must not be compiled
with `unsafe_no_auto_barriers`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sfm.kernels.depth import DepthWeights
from sfm.kernels.depth_plan import round_up
from sfm.kernels.sampling_gpu import sample_columns

ROWS = 64  # wgmma M: the feature rows of a tile
BT = 64  # the batch tile: wgmma N (32 with a 64-byte swizzle fails layout inference)
TK = 64  # the contraction tile
LOGITS_SMEM_BYTES = 128 << 10  # a position's logits stay in SMEM up to this size
f32 = jnp.float32


class _Io:
    """Synchronous traffic between global memory and registers through SMEM staging (the
    elementwise stages; the products pipeline their own): [64, Bt] tiles of the compute
    dtype and [64] float32 vectors (norm scales, RoPE tables)."""

    def __init__(self, tile: Any, vector: Any, barrier: Any, interpret: bool) -> None:
        self.tile, self.vector, self.barrier = tile, vector, barrier
        self.interpret = interpret

    def fetch(self, src: Any, dst: Any) -> None:
        plgpu.copy_gmem_to_smem(src, dst, self.barrier)
        plgpu.barrier_wait(self.barrier)

    def load(self, src: Any) -> jax.Array:
        self.fetch(src, self.tile)
        return layout(self.tile[...], plgpu.Layout.WGMMA, self.interpret).astype(f32)

    def load_vector(self, src: Any) -> jax.Array:
        """[64] float32 from a global [64] slice, as a column broadcast over the tile."""
        self.fetch(src, self.vector)
        v = layout(self.vector[...], plgpu.Layout.WGMMA.reduce(1), self.interpret)
        return lax.broadcast_in_dim(v, (ROWS, BT), (0,))

    def store(self, value: jax.Array, dst: Any) -> None:
        self.tile[...] = value.astype(self.tile.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(self.tile, dst)
        plgpu.wait_smem_to_gmem(0)


Epilogue = Callable[[jax.Array, jax.Array], None]


def kernel(
    *refs: Any,
    w: DepthWeights,
    dtype: Any,
    greedy: bool,
    interpret: bool,
    logits_in_smem: bool,
    scoring: bool,
) -> None:
    """The frame for one tile of BT sequences (grid axis "tiles"); refs as
    `depth_frame_gpu` passes them: operands, outputs (tokens, the state buffers), scratch."""
    csm, rope_on = w.kind == "csm", w.max_period is not None
    vp = round_up(w.vocab, ROWS)
    it = iter(refs)
    h_t, first_t, rows_gmem = (next(it) for _ in range(3))
    w_in, norm1, wqkv, wo, norm2, w1, w2, heads = (next(it) for _ in range(8))
    head0 = next(it) if csm else None
    emb_t = next(it) if w.emb else None
    rope = [next(it), next(it), next(it)] if rope_on else None  # cos^T, sin^T, pair swap
    out = next(it)
    x_t, act_t, ab_t, hot_t, kv_t = (next(it) for _ in range(5))
    logits_gmem = next(it) if not logits_in_smem else None
    scored = next(it) if scoring else None  # [P, Vp, B]: each position's logits
    logits = next(it) if logits_in_smem else None
    tile, vector = next(it), next(it)
    swap_in, swap = (next(it), next(it)) if rope_on else (None, None)
    scores, prev, tokens, rows_in, barrier = it

    b = lax.axis_index("tiles")
    col = pl.ds(b * BT, BT)
    io = _Io(tile, vector, barrier, interpret)
    # This tile's sampling inputs, [4 (+ P), Bt] int32 (seed words, temperature bits,
    # top-k; scoring: the given tokens) and (RoPE) the pair swap, into SMEM.
    io.fetch(rows_gmem.at[:, col], rows_in)
    if rope is not None:
        io.fetch(rope[2], swap)

    def _col(v_b: jax.Array) -> jax.Array:
        v_b = layout(v_b, plgpu.Layout.WGMMA.reduce(0), interpret)
        return lax.broadcast_in_dim(v_b, (ROWS, BT), (1,))

    h, g, hd, d, hidden = w.num_heads, w.kv_heads, w.head_dim, w.dim, w.hidden
    dq, dk = h * hd, g * hd
    vocab = w.vocab
    tf_a = transforms(ROWS, TK, dtype, interpret)
    tf_b = transforms(TK, BT, dtype, interpret)

    def rounded(v: jax.Array) -> jax.Array:
        return v.astype(dtype).astype(f32)

    def matmul(w_nk: Any, src: Any, epilogue: Epilogue) -> None:
        """For each 64-row chunk n of w_nk [N, K]: epilogue(n, (w_nk @ src)[chunk n])
        (float32 [64, Bt]); src [K, Bt] a global feature-major buffer."""
        n_rows, k = w_nk.shape

        def chunk(n: jax.Array, carry: None) -> None:
            def scope(acc: Any) -> None:
                def body(_: Any, a_smem: Any, b_smem: Any) -> None:
                    plgpu.wgmma(acc, a_smem, b_smem)
                    plgpu.wgmma_wait(0)

                plgpu.emit_pipeline(
                    body,
                    grid=(k // TK,),
                    in_specs=[
                        plgpu.BlockSpec((ROWS, TK), lambda kk: (n, kk), transforms=tf_a),
                        plgpu.BlockSpec((TK, BT), lambda kk: (kk, 0), transforms=tf_b),
                    ],
                    max_concurrent_steps=2,
                )(w_nk, src)
                epilogue(n, acc[...])

            pl.run_scoped(scope, plgpu.ACC((ROWS, BT), f32))

        lax.fori_loop(0, n_rows // ROWS, chunk, None)

    def rows(buf: Any, n: Any) -> Any:
        """Rows n*64 .. n*64 + 63 of a global [rows, B] buffer, this tile's columns."""
        return buf.at[pl.ds(n * ROWS, ROWS), col]

    def store_rounded(dst: Any) -> Epilogue:
        return lambda n, y: io.store(rounded(y), rows(dst, n))

    def add_to_residual(n: jax.Array, y: jax.Array) -> None:
        io.store(rounded(io.load(rows(x_t, n)) + rounded(y)), rows(x_t, n))

    def rms_norm(alpha: Any) -> None:
        """act[:D'] = RMSNorm(x) * alpha (alpha a global [D'] float32)."""

        def square_sum(n: jax.Array, acc: jax.Array) -> jax.Array:
            return acc + jnp.sum(jnp.square(io.load(rows(x_t, n))), axis=0)

        total = lax.fori_loop(0, d // ROWS, square_sum, jnp.zeros((BT,), f32))
        inv = lax.rsqrt(w.norm_eps + total / d)

        def scale(n: jax.Array, carry: None) -> None:
            factor = io.load_vector(alpha.at[pl.ds(n * ROWS, ROWS)]) * _col(inv)
            io.store(rounded(io.load(rows(x_t, n)) * factor), rows(act_t, n))

        lax.fori_loop(0, d // ROWS, scale, None)

    def position(j: jax.Array, carry: None) -> None:
        s = j if not csm else 0
        # The input: the projection of h (moshi, plus the text token's or the previous
        # token's embedding) or of the previous token's embedding (csm, h at j = 0).
        if emb_t is not None:
            pl.when(j > 0)(lambda: embed(j))
        if csm:

            @pl.when(j == 0)
            def _() -> None:
                lax.fori_loop(
                    0, h_t.shape[0] // ROWS,
                    lambda n, c: io.store(io.load(rows(h_t, n)), rows(hot_t, n)), None,
                )  # fmt: skip

            matmul(w_in.at[0], hot_t.at[: w_in.shape[-1], col], store_rounded(x_t))
        else:

            def plus_input(n: jax.Array, y: jax.Array) -> None:
                def add(extra: Any) -> None:
                    io.store(rounded(rounded(y) + io.load(rows(extra, n))), rows(x_t, n))

                pl.when(j == 0)(lambda: add(first_t))
                pl.when(j > 0)(lambda: add(ab_t))

            matmul(w_in.at[s], h_t.at[:, col], plus_input)

        def layer(ll: jax.Array, carry: None) -> None:
            attention_block(j, s, ll)
            rms_norm(norm2.at[ll, 0])
            matmul(w1.at[ll, s], act_t.at[:d, col], store_rounded(ab_t))

            def gate(n: jax.Array, carry: None) -> None:
                a, bb = io.load(rows(ab_t, n)), io.load(rows(ab_t, n + hidden // ROWS))
                sig = rounded(1.0 / (1.0 + jnp.exp(-a)))
                io.store(rounded(rounded(a * sig) * bb), rows(act_t, n))

            lax.fori_loop(0, hidden // ROWS, gate, None)
            matmul(w2.at[ll, s], act_t.at[:hidden, col], add_to_residual)

        lax.fori_loop(0, w.layers, layer, None)
        head_and_draw(j)

    def embed(j: jax.Array) -> None:
        """ab[:De] = table_{j-1}^T @ onehot(prev) (moshi) / hot[:De] (csm): a row gather."""
        vp1 = emb_t.shape[-1]

        def one_hot(n: jax.Array, carry: None) -> None:
            index = lax.broadcasted_iota(jnp.int32, (ROWS, BT), 0) + n * ROWS
            io.store((index == _col(prev[...])).astype(f32), rows(hot_t, n))

        lax.fori_loop(0, vp1 // ROWS, one_hot, None)
        matmul(emb_t.at[j - 1], hot_t.at[:vp1, col], store_rounded(ab_t))
        if csm:  # the projection reads hot[:De], once the one-hot rows are consumed
            lax.fori_loop(
                0, emb_t.shape[1] // ROWS,
                lambda n, c: io.store(io.load(rows(ab_t, n)), rows(hot_t, n)), None,
            )  # fmt: skip

    def attention_block(j: jax.Array, s: Any, ll: jax.Array) -> None:
        rms_norm(norm1.at[ll, 0])

        def put(n: jax.Array, y: jax.Array) -> None:
            """q -> ab[:dq]; k, v -> this position's rows of the cache."""
            pl.when(n < dq // ROWS)(lambda: io.store(y, rows(ab_t, n)))
            pl.when(n >= dq // ROWS)(lambda: io.store(y, rows(kv_t.at[ll, j], n - dq // ROWS)))

        def qkv(n: jax.Array, y: jax.Array) -> None:
            y = rounded(y)
            if rope is None:
                put(n, y)
                return
            pl.when(n < (dq + dk) // ROWS)(lambda: put(n, rotate(j, n, y)))
            pl.when(n >= (dq + dk) // ROWS)(lambda: put(n, y))

        matmul(wqkv.at[ll, s], act_t.at[:d, col], qkv)
        per_group = h // g
        scale = hd**-0.5

        def head(hh: jax.Array, carry: None) -> None:
            kv_rows = (hh // per_group) * (hd // ROWS)

            def score(jj: jax.Array, carry: None) -> None:
                def part(c: jax.Array, acc: jax.Array) -> jax.Array:
                    q = io.load(rows(ab_t, hh * (hd // ROWS) + c))
                    k = io.load(rows(kv_t.at[ll, jj], kv_rows + c))
                    return acc + jnp.sum(q * k, axis=0)

                total = lax.fori_loop(0, hd // ROWS, part, jnp.zeros((BT,), f32))
                scores[jj] = rounded(total) * scale

            lax.fori_loop(0, j + 1, score, None)
            top = lax.fori_loop(0, j + 1, lambda jj, m: jnp.maximum(m, scores[jj]),
                                jnp.full((BT,), -jnp.inf, f32))  # fmt: skip
            norm = lax.fori_loop(0, j + 1, lambda jj, z: z + jnp.exp(scores[jj] - top),
                                 jnp.zeros((BT,), f32))  # fmt: skip

            def out_part(c: jax.Array, carry: None) -> None:
                def add(jj: jax.Array, acc: jax.Array) -> jax.Array:
                    p = rounded(jnp.exp(scores[jj] - top) / norm)
                    dk_rows = kv_t.shape[2] // 2 // ROWS  # values follow the keys
                    return acc + _col(p) * io.load(rows(kv_t.at[ll, jj], dk_rows + kv_rows + c))

                attn = lax.fori_loop(0, j + 1, add, jnp.zeros((ROWS, BT), f32))
                io.store(rounded(attn), rows(act_t, hh * (hd // ROWS) + c))

            lax.fori_loop(0, hd // ROWS, out_part, None)

        lax.fori_loop(0, h, head, None)
        matmul(wo.at[ll, s], act_t.at[:dq, col], add_to_residual)

    def rotate(j: jax.Array, n: jax.Array, y: jax.Array) -> jax.Array:
        """RoPE of q/k chunk n at position j: y cos + swap_pairs(y) sin (rows are lanes)."""
        cos_t, sin_t, _ = rope
        is_k = (n >= dq // ROWS).astype(jnp.int32)
        lanes = pl.ds((n - is_k * (dq // ROWS)) * ROWS, ROWS)  # k reads the first G hd
        swap_in[...] = y.astype(dtype)
        plgpu.commit_smem()

        def swapped_scope(acc: Any) -> jax.Array:
            plgpu.wgmma(acc, swap, swap_in)
            plgpu.wgmma_wait(0)
            return acc[...]

        swapped = pl.run_scoped(swapped_scope, plgpu.ACC((ROWS, BT), f32))
        cos, sin = io.load_vector(cos_t.at[j, lanes]), io.load_vector(sin_t.at[j, lanes])
        return y * cos + swapped * sin

    def head_and_draw(j: jax.Array) -> None:
        def to_logits(n: jax.Array, y: jax.Array) -> None:
            if logits is not None:
                logits[pl.ds(n * ROWS, ROWS), :] = y.astype(dtype)
            else:
                io.store(y, rows(logits_gmem, n))
            if scored is not None:
                io.store(y, rows(scored.at[j], n))

        def load_logits(t: jax.Array) -> jax.Array:
            if logits is not None:
                tile_vb = logits[pl.ds(t * ROWS, ROWS), :]
                return layout(tile_vb, plgpu.Layout.WGMMA, interpret).astype(f32)
            return io.load(rows(logits_gmem, t))

        if csm:
            assert head0 is not None
            pl.when(j == 0)(lambda: matmul(head0.at[0], h_t.at[:, col], to_logits))
            pl.when(j > 0)(lambda: matmul(heads.at[jnp.maximum(j - 1, 0)], x_t.at[:, col],
                                          to_logits))  # fmt: skip
        else:
            matmul(heads.at[j], x_t.at[:, col], to_logits)
        temp = lax.bitcast_convert_type(rows_in[2], f32)
        token = sample_columns(
            load_logits, vp // ROWS, BT, vocab, rows_in[0], rows_in[1], j, temp, rows_in[3],
            greedy=greedy,
        )  # fmt: skip
        tokens[j] = token
        fed = token if scored is None else rows_in[4 + j]
        prev[...] = layout(fed, plgpu.Layout.WGMMA.reduce(0), interpret)

    lax.fori_loop(0, w.positions, position, None)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(tokens, out.at[:, col])
    plgpu.wait_smem_to_gmem(0)


def layout(x: jax.Array, to: Any, interpret: bool) -> jax.Array:
    """A layout hint for Mosaic GPU's inference (the interpreter keeps no layouts)."""
    return x if interpret else plgpu.layout_cast(x, to)


def transforms(rows: int, cols: int, dtype: Any, interpret: bool) -> tuple[Any, ...]:
    """Tiling + swizzle of a [rows, cols] SMEM tile (none in the interpreter, which keeps
    tiles logical)."""
    if interpret:
        return ()
    width = cols * jnp.dtype(dtype).itemsize
    swizzle = min(128, width)
    return (
        plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(swizzle),
    )
