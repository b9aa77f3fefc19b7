"""The depth frame as one Mosaic GPU (Hopper) kernel: all P positions of a frame, every
layer, the heads and the sampling, in one launch (a CTA per tile of 64 sequences).

Layout. Decoding multiplies weights [out, in] by a handful of sequences, so the products
run "swapped": the weight rows are wgmma's 64-row M side and the batch tile (Bt = 64
sequences) its N side, y^T[out, Bt] = W[out, in] @ x^T[in, Bt]. Every activation is
therefore kept feature-major, [features, Bt] (a column per sequence), and both wgmma
operands are read in their stored layouts: a weight tile [64, 64] straight from the
model's array and an activation tile [64, Bt], each copied by TMA into swizzled shared
memory, two stages in flight (`plgpu.emit_pipeline`). Per-sequence quantities (norm
statistics, attention scores, sampling bounds) are [Bt] vectors: reductions over the
feature axis. (A 32-sequence tile needs a 64-byte swizzle, which Mosaic GPU's layout
inference rejects for these products.)

State. A frame's state does not fit in shared memory at model sizes (Moshi's keys and
values alone are L x P x 2 x 1024 x Bt), so it lives in global memory (L2-resident at
these sizes), in buffers that are outputs of the launch and discarded by the wrapper: the
residual stream, the input of the next product, the gated MLP's halves / q / embeddings,
the frame's keys and values. A position's logits wait for the sampler in shared memory
when they fit (`LOGITS_SMEM_BYTES`), else in global memory (Moshi's 2048 x 64 bfloat16).
Every write to global memory completes (`wait_smem_to_gmem`) before a later stage copies
it back.

Per position j: the previous token's embedding is a one-hot product with the position's
table (the wrapper transposes and stacks the tables per call, [P - 1, De, V + 1]), then
the input projection; per layer: RMSNorm, the q/k/v product (RoPE for csm: the pair swap
is a product with a 0/1 permutation tile, exact), attention over positions 0..j head by
head, the output product added to the residual, RMSNorm, the gated MLP; then the head's
logits and the draw (`sfm.kernels.sampling_gpu`), which feeds position j + 1.

Rounding follows the model's (and `sfm.kernels.depth.reference`'s): products take
operands in the compute dtype and accumulate in float32, and results are rounded to the
compute dtype where the model rounds them. bfloat16 and float16 only: Hopper's float32
wgmma is TF32, which the reference does not round to; float32 frames use the reference.
Feature sizes must be multiples of 64 (the vocabulary is padded). Scoring given codes
(`given_bp`) feeds them on and writes each position's logits out.

Speed is unmeasured (no GPU has run it): one CTA streams all the weights for its tile, so
below 64 sequences the frame uses one SM's share of the memory bandwidth, and every
elementwise stage waits on its own copies. Splitting each product's rows over a cluster of
CTAs is the next step once `bench/depth_kernels.py` has timed this one on a GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sfm.kernels.depth import DepthWeights, rope_tables
from sfm.kernels.sampling_gpu import sample_columns

ROWS = 64  # wgmma M: the feature rows of a tile
BT = 64  # the batch tile: wgmma N (32 with a 64-byte swizzle fails layout inference)
TK = 64  # the contraction tile
LOGITS_SMEM_BYTES = 128 << 10  # a position's logits stay in SMEM up to this size
f32 = jnp.float32


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def supports(w: DepthWeights, dtype: Any) -> str | None:
    """Why this kernel cannot run the frame (None when it can)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name}: the GPU kernel runs bfloat16 / float16"
    sizes = {
        "dim": w.dim, "temporal dim": w.w_in.shape[-1], "head_dim": w.head_dim,
        "hidden": w.hidden, "embedding width": w.emb[0].shape[-1] if w.emb else ROWS,
    }  # fmt: skip
    bad = [f"{k} {v}" for k, v in sizes.items() if v % ROWS]
    return f"{', '.join(bad)}: not a multiple of {ROWS}" if bad else None


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


def _kernel(
    *refs: Any,
    w: DepthWeights,
    dtype: Any,
    greedy: bool,
    interpret: bool,
    logits_in_smem: bool,
    scoring: bool,
) -> None:
    csm = w.kind == "csm"
    vp = round_up(w.vocab, ROWS)
    it = iter(refs)
    h_t, first_t, rows_gmem = (next(it) for _ in range(3))
    w_in, norm1, wqkv, wo, norm2, w1, w2, heads = (next(it) for _ in range(8))
    head0 = next(it) if csm else None
    emb_t = next(it) if w.emb else None
    rope = [next(it), next(it), next(it)] if csm else None  # cos^T, sin^T, pair swap
    out = next(it)
    x_t, act_t, ab_t, hot_t, kv_t = (next(it) for _ in range(5))
    logits_gmem = next(it) if not logits_in_smem else None
    scored = next(it) if scoring else None  # [P, Vp, B]: each position's logits
    logits, tile, vector, swap_in, swap, scores, prev, tokens, rows_in, barrier = it

    b = lax.axis_index("tiles")
    col = pl.ds(b * BT, BT)
    io = _Io(tile, vector, barrier, interpret)
    # This tile's sampling inputs, [4 (+ P), Bt] int32 (seed words, temperature bits,
    # top-k; scoring: the given tokens) and (csm) the pair swap, into SMEM.
    io.fetch(rows_gmem.at[:, col], rows_in)
    if csm:
        io.fetch(rope[2], swap)

    def _col(v_b: jax.Array) -> jax.Array:
        v_b = layout(v_b, plgpu.Layout.WGMMA.reduce(0), interpret)
        return lax.broadcast_in_dim(v_b, (ROWS, BT), (1,))

    h, g, hd, d, hidden = w.num_heads, w.kv_heads, w.head_dim, w.dim, w.hidden
    dq, dk = h * hd, g * hd
    vocab = w.vocab
    tf_a = _transforms(ROWS, TK, dtype, interpret)
    tf_b = _transforms(TK, BT, dtype, interpret)

    def rounded(v: jax.Array) -> jax.Array:
        return v.astype(dtype).astype(f32)

    def matmul(w_nk: Any, src: Any, epilogue: Any) -> None:
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

    def rows(buf: Any, n: Any, count: int = 1) -> Any:
        """Rows n*64 .. of a global [rows, B] buffer, this tile's columns."""
        return buf.at[pl.ds(n * ROWS, count * ROWS), col]

    def store_rounded(dst: Any, offset: int = 0) -> Any:
        return lambda n, y: io.store(rounded(y), rows(dst, n + offset // ROWS))

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
            if logits_gmem is None:
                logits[pl.ds(n * ROWS, ROWS), :] = y.astype(dtype)
            else:
                io.store(y, rows(logits_gmem, n))
            if scored is not None:
                io.store(y, rows(scored.at[j], n))

        def load_logits(t: jax.Array) -> jax.Array:
            if logits_gmem is None:
                return layout(logits[pl.ds(t * ROWS, ROWS), :], plgpu.Layout.WGMMA, interpret)
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


def _transforms(rows: int, cols: int, dtype: Any, interpret: bool) -> tuple[Any, ...]:
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


def depth_frame_gpu(
    w: DepthWeights,
    h_bd: jax.Array,
    first_bd: jax.Array,
    seeds_b2: jax.Array,
    temp_b1: jax.Array,
    top_k_b1: jax.Array,
    *,
    greedy: bool,
    interpret: Any = False,
    logits_in_smem: bool | None = None,
    given_bp: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`sfm.kernels.depth.depth_frame` as one Mosaic GPU launch per 64-sequence tile:
    tokens [B, P] (with `given_bp`, also the logits [P, B, V] float32 given those codes).
    `interpret`: False lowers for the GPU; True or an `InterpretGPUParams` runs the Mosaic
    GPU interpreter (CPU). `logits_in_smem`: where a position's logits wait for the
    sampler (default: shared memory when they take at most `LOGITS_SMEM_BYTES`, else
    global memory)."""
    dtype = h_bd.dtype
    if (why := supports(w, dtype)) is not None:
        raise ValueError(f"depth frame on the GPU kernel: {why}")
    if interpret is True:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        interpret = InterpretGPUParams()
    batch, p, csm = h_bd.shape[0], w.positions, w.kind == "csm"
    padded = round_up(batch, BT)

    def columns(a: jax.Array, value: Any = 0) -> jax.Array:  # [B, n] -> [n, Bp]
        return jnp.pad(a, ((0, padded - batch), (0, 0)), constant_values=value).T

    vp = round_up(w.vocab, ROWS)
    heads = jnp.pad(w.heads, ((0, 0), (0, vp - w.vocab), (0, 0))).astype(dtype)
    sampling_rows = jnp.concatenate(
        [
            columns(seeds_b2.astype(jnp.int32)),
            columns(lax.bitcast_convert_type(temp_b1.astype(f32), jnp.int32)),
            columns(top_k_b1.astype(jnp.int32), 1),
        ]
    )  # [4, Bp]: seed words, temperature bits, top-k
    scoring = given_bp is not None
    if scoring:
        sampling_rows = jnp.concatenate([sampling_rows, columns(given_bp.astype(jnp.int32))])
    operands = [
        columns(h_bd), columns(first_bd.astype(dtype)), sampling_rows,
        w.w_in.astype(dtype), w.norm1.astype(f32), w.wqkv.astype(dtype), w.wo.astype(dtype),
        w.norm2.astype(f32),
        w.w1.astype(dtype), w.w2.astype(dtype), heads,
    ]  # fmt: skip
    if csm:
        assert w.head0 is not None
        operands.append(jnp.pad(w.head0, ((0, 0), (0, vp - w.vocab), (0, 0))).astype(dtype))
    vp1 = round_up(w.vocab + 1, ROWS)
    if w.emb:  # [P - 1, De, V + 1 padded]: the tables transposed, for a one-hot product
        operands.append(
            jnp.stack([jnp.pad(t.astype(dtype).T, ((0, 0), (0, vp1 - t.shape[0]))) for t in w.emb])
        )
    if csm:
        cos, sin = rope_tables(w)
        pair = jnp.arange(ROWS) ^ 1
        swap = (jnp.arange(ROWS)[:, None] == pair[None]).astype(dtype)
        operands += [cos[:, 0], sin[:, 0], swap]
    din = w.w_in.shape[-1]
    widest = max(w.dim, w.hidden, w.num_heads * w.head_dim, din)
    ab_rows = max(2 * w.hidden, w.num_heads * w.head_dim, w.emb[0].shape[-1] if w.emb else 0)
    buffers = [
        jax.ShapeDtypeStruct((w.dim, padded), dtype),  # the residual stream
        jax.ShapeDtypeStruct((widest, padded), dtype),  # the next product's input
        jax.ShapeDtypeStruct((ab_rows, padded), dtype),  # MLP halves / q / embeddings
        jax.ShapeDtypeStruct((max(vp1, din), padded), dtype),  # one-hot rows / csm input
        jax.ShapeDtypeStruct((w.layers, p, 2 * w.kv_heads * w.head_dim, padded), dtype),
    ]
    if logits_in_smem is None:
        logits_in_smem = vp * BT * jnp.dtype(dtype).itemsize <= LOGITS_SMEM_BYTES
    if not logits_in_smem:
        buffers.append(jax.ShapeDtypeStruct((vp, padded), dtype))
    if scoring:
        buffers.append(jax.ShapeDtypeStruct((p, vp, padded), dtype))
    out_shape = [jax.ShapeDtypeStruct((p, padded), jnp.int32), *buffers]
    interpreting = bool(interpret)
    tile_tf = _transforms(ROWS, BT, dtype, interpreting)
    swap_tf = _transforms(ROWS, ROWS, dtype, interpreting)
    scratch = [
        plgpu.SMEM((vp if logits_in_smem else ROWS, BT), dtype, transforms=tile_tf),  # logits
        plgpu.SMEM((ROWS, BT), dtype, transforms=tile_tf),  # staging of elementwise tiles
        plgpu.SMEM((ROWS,), f32),  # staging of [64] vectors
        plgpu.SMEM((ROWS, BT), dtype, transforms=tile_tf),  # RoPE's input to the pair swap
        plgpu.SMEM((ROWS, ROWS), dtype, transforms=swap_tf),  # the pair swap (csm)
        plgpu.SMEM((p, BT), f32),  # attention scores of one head
        plgpu.SMEM((BT,), jnp.int32),  # the previous token
        plgpu.SMEM((p, BT), jnp.int32),  # the frame's tokens
        plgpu.SMEM((4 + p * scoring, BT), jnp.int32),  # this tile's sampling inputs
        plgpu.Barrier(num_arrivals=1),
    ]
    kernel = functools.partial(
        _kernel, w=w, dtype=dtype, greedy=greedy, interpret=interpreting,
        logits_in_smem=logits_in_smem, scoring=scoring,
    )  # fmt: skip
    # Every operand and output stays in global memory; the kernel copies what it needs.
    tokens, *rest = plgpu.kernel(
        kernel,
        out_type=out_shape,
        scratch_types=scratch,
        grid=(padded // BT,),
        grid_names=("tiles",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret or None,
    )(*operands)
    if scoring:
        return tokens[:, :batch].T, rest[-1][:, : w.vocab, :batch].transpose(0, 2, 1).astype(f32)
    return tokens[:, :batch].T


__all__ = ["BT", "depth_frame_gpu", "supports"]
