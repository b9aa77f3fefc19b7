"""The depth frame as one Pallas TPU (Mosaic) kernel: all P positions of a frame, every
layer, the heads and the sampling, in one launch per batch tile.

Grid (batch tile b, position j, layer l), run in that order on a core. The weights of
(j, l) are blocks that Pallas's pipeline fetches from HBM while the previous (j, l)
computes (double buffering); per step the small state stays in VMEM scratch across grid
iterations: the residual stream x [Bt, D'], the keys and values of every layer at every
position of this frame [L, P, Bt, H hd] and the previous token [Bt, 1]. At l = 0 the
position's input is built (projection of h and the previous token's embedding, the latter
as a one-hot product with the table: a gather a TPU core does on the MXU); at l = L - 1 the
position's head runs and its token is sampled (`sfm.kernels.sampling`) into the output and
into the next position's input. Batch tiles are independent ("parallel": split over the
cores of a megacore chip).

Attention over the <= P keys of a position works on whole [P, Bt, H hd] blocks: the per-head
sums of q * k and the spreading of per-head weights back to lanes are products with a 0/1
head-sum matrix, so nothing is reshaped across lanes; keys and values of grouped heads are
widened to all H heads once, when written (a 0/1 product too). RoPE's pair swap is two lane
rotations.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sfm.kernels.depth import DepthWeights, rope_tables
from sfm.kernels.sampling import sample_rows

_MIB = 1 << 20


def _dense(x: jax.Array, w_oi: jax.Array, dtype: Any) -> jax.Array:
    """x [B, in] @ w.T, operands in `dtype`, float32 result."""
    return jax.lax.dot_general(
        x.astype(dtype),
        w_oi.astype(dtype),
        (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32,
    )


def _rms(x: jax.Array, alpha: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = eps + jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return x32 * (alpha.astype(jnp.float32) * jax.lax.rsqrt(var))


def _swap_pairs(x: jax.Array) -> jax.Array:
    """Adjacent lane pairs (a, b) -> (b, a) of a [rows, n] block: two lane rotations."""
    n = x.shape[-1]
    lane = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.where(lane % 2 == 0, pltpu.roll(x, n - 1, 1), pltpu.roll(x, 1, 1))


def _kernel(*refs: Any, w: DepthWeights, dtype: Any, greedy: bool, widen: bool) -> None:
    csm = w.kind == "csm"
    it = iter(refs)
    h_ref, first_ref, seeds_ref, temp_ref, topk_ref = (next(it) for _ in range(5))
    w_in_ref, emb_ref, n1_ref, wqkv_ref, wo_ref, n2_ref, w1a_ref, w1b_ref, w2_ref = (
        next(it) for _ in range(9)
    )
    heads_ref = next(it)
    head0_ref = next(it) if csm else None
    cos_ref, sin_ref, hsum_ref = next(it), next(it), next(it)
    widen_ref = next(it) if widen else None
    out_ref, x_sc, xn_sc, acc_sc, k_sc, v_sc, prev_sc = (next(it) for _ in range(7))

    j, layer, chunk = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    p, bt, n_layers, n_chunks = k_sc.shape[1], x_sc.shape[0], w.layers, pl.num_programs(3)
    h, hd = w.num_heads, w.head_dim
    dq, dk = h * hd, w.kv_heads * hd

    @pl.when((layer == 0) & (chunk == 0))
    def _position_input() -> None:
        vocab1 = emb_ref.shape[0]
        onehot = jax.lax.broadcasted_iota(jnp.int32, (bt, vocab1), 1) == prev_sc[...]
        e = jnp.dot(
            onehot.astype(dtype), emb_ref[...].astype(dtype), preferred_element_type=jnp.float32
        )
        if csm:
            src = jnp.where(j == 0, h_ref[...].astype(jnp.float32), e)
            x = _dense(src, w_in_ref[...], dtype)
        else:
            x = _dense(h_ref[...], w_in_ref[...], dtype)
            x = x + jnp.where(j == 0, first_ref[...].astype(jnp.float32), e)
        x_sc[...] = x.astype(x_sc.dtype)

    @pl.when(chunk == 0)
    def _attention() -> None:
        x = x_sc[...]
        xn = _rms(x, n1_ref[...], w.norm_eps)
        q = _dense(xn, wqkv_ref[pl.ds(0, dq), :], dtype)
        k = _dense(xn, wqkv_ref[pl.ds(dq, dk), :], dtype)
        v = _dense(xn, wqkv_ref[pl.ds(dq + dk, dk), :], dtype)
        if w.max_period is not None:
            cos, sin = cos_ref[...], sin_ref[...]
            q = q * cos + _swap_pairs(q) * sin
            k = k * cos[:, :dk] + _swap_pairs(k) * sin[:, :dk]
        k, v = k.astype(dtype), v.astype(dtype)
        if widen_ref is not None:  # grouped heads -> all H heads (exact: a 0/1 product)
            k = jnp.dot(k, widen_ref[...].astype(dtype), preferred_element_type=jnp.float32)
            v = jnp.dot(v, widen_ref[...].astype(dtype), preferred_element_type=jnp.float32)
        k_sc[layer, j] = k.astype(k_sc.dtype)
        v_sc[layer, j] = v.astype(v_sc.dtype)

        # Keys past position j hold an earlier frame's values (or nothing): masked out.
        visible = jax.lax.broadcasted_iota(jnp.int32, (p, bt, dq), 0) <= j
        q32 = q.astype(dtype).astype(jnp.float32)
        qk = jnp.where(visible, k_sc[layer].astype(jnp.float32) * q32[None], 0.0)
        hsum = hsum_ref[...]
        scores = jnp.dot(qk.reshape(p * bt, dq), hsum, preferred_element_type=jnp.float32)
        scores = scores.reshape(p, bt, h) * hd**-0.5
        seen = jax.lax.broadcasted_iota(jnp.int32, (p, bt, h), 0) <= j
        scores = jnp.where(seen, scores, -jnp.inf)
        probs = jnp.exp(scores - jnp.max(scores, axis=0, keepdims=True))
        probs = (probs / jnp.sum(probs, axis=0, keepdims=True)).astype(dtype)
        spread = jax.lax.dot_general(
            probs.astype(jnp.float32).reshape(p * bt, h),
            hsum,
            (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        ).reshape(p, bt, dq)
        values = v_sc[layer].astype(jnp.float32)
        attn = jnp.sum(jnp.where(visible, spread * values, 0.0), axis=0)
        x = (x + _dense(attn.astype(dtype), wo_ref[...], dtype).astype(dtype)).astype(dtype)
        x_sc[...] = x.astype(x_sc.dtype)
        xn_sc[...] = _rms(x, n2_ref[...], w.norm_eps).astype(xn_sc.dtype)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    # One chunk of the gated MLP's hidden units; the output sums in float32 over chunks.
    xn = xn_sc[...]
    a = _dense(xn, w1a_ref[...], dtype).astype(dtype)
    b = _dense(xn, w1b_ref[...], dtype).astype(dtype)
    acc_sc[...] += _dense((jax.nn.silu(a) * b).astype(dtype), w2_ref[...], dtype)

    def emit(logits: jax.Array) -> None:
        logits = logits.astype(dtype).astype(jnp.float32)
        token = sample_rows(logits, seeds_ref[...], j, temp_ref[...], topk_ref[...], greedy=greedy)
        prev_sc[...] = token
        out_ref[j] = token

    @pl.when(chunk == n_chunks - 1)
    def _layer_out() -> None:
        x = (x_sc[...] + acc_sc[...].astype(dtype)).astype(dtype)
        x_sc[...] = x.astype(x_sc.dtype)
        last = layer == n_layers - 1
        if csm:
            assert head0_ref is not None
            pl.when(last & (j == 0))(lambda: emit(_dense(h_ref[...], head0_ref[...], dtype)))
            pl.when(last & (j > 0))(lambda: emit(_dense(x, heads_ref[...], dtype)))
        else:
            pl.when(last)(lambda: emit(_dense(x, heads_ref[...], dtype)))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def sublanes(dtype: Any) -> int:
    """Rows of one VMEM tile for `dtype` (8 for 32-bit, 16 for 16-bit values)."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def block_rows(batch: int, dtype: Any, block_b: int | None = None) -> int:
    """The batch tile: the whole (padded) batch up to 256 rows, so a frame streams each
    weight once; `block_b` overrides it (a multiple of the sublane tile)."""
    sub = sublanes(dtype)
    bt = block_b or min(_round_up(batch, sub), 256)
    if bt % sub:
        raise ValueError(f"block_b: {bt} must be a multiple of {sub} for {jnp.dtype(dtype)}")
    return bt


def hidden_block(w: DepthWeights, block_f: int | None = None, max_bytes: int = 2 * _MIB) -> int:
    """Hidden units per MLP chunk: the largest multiple of 128 dividing F whose chunk of
    a weight ([chunk, D'], as stored) fits `max_bytes` (F itself when no such multiple)."""
    f = w.hidden
    if block_f is not None:
        if f % block_f or (block_f % 128 and block_f != f):
            raise ValueError(f"block_f: {block_f} must divide {f} and be a multiple of 128")
        return block_f
    row = w.dim * jnp.dtype(w.w1.dtype).itemsize
    fits = [c for c in range(128, f + 1, 128) if f % c == 0 and c * row <= max_bytes]
    return max(fits) if fits else (128 if f % 128 == 0 else f)


def _specs(w: DepthWeights, bt: int, bf: int, widen: bool, single: bool) -> list[pl.BlockSpec]:
    """Input block specs over the grid (b, j, l, c), in the kernel's operand order. With
    `single`, the blocks that change once per position (input projection, embedding table,
    heads) and the constant ones get one buffer instead of two."""
    moshi = w.kind == "moshi"
    mode = dict(pipeline_mode=pl.Buffered(1)) if single else {}
    chunks = w.hidden // bf

    def step(j: Any) -> Any:
        return j if moshi else 0

    def head(j: Any) -> Any:
        return j if moshi else jnp.maximum(j - 1, 0)

    def rows(width: int) -> pl.BlockSpec:
        return pl.BlockSpec((bt, width), lambda b, j, layer, c: (b, 0))

    def per_layer(a: jax.Array) -> pl.BlockSpec:
        return pl.BlockSpec(
            (None, None, *a.shape[2:]), lambda b, j, layer, c: (layer, step(j), 0, 0)
        )

    def once(shape: tuple[int, ...]) -> pl.BlockSpec:  # the same block all along
        return pl.BlockSpec(shape, lambda b, j, layer, c: (0,) * len(shape), **mode)

    d = w.dim
    specs = [
        rows(w.w_in.shape[-1]), rows(d), rows(2), rows(1), rows(1),
        pl.BlockSpec((None, *w.w_in.shape[1:]), lambda b, j, layer, c: (step(j), 0, 0), **mode),
        pl.BlockSpec(
            (None, *w.emb.shape[1:]), lambda b, j, layer, c: (jnp.maximum(j - 1, 0), 0, 0), **mode
        ),
        pl.BlockSpec((None, 1, d), lambda b, j, layer, c: (layer, 0, 0)),
        per_layer(w.wqkv), per_layer(w.wo),
        pl.BlockSpec((None, 1, d), lambda b, j, layer, c: (layer, 0, 0)),
        pl.BlockSpec((None, None, bf, d), lambda b, j, layer, c: (layer, step(j), c, 0)),
        pl.BlockSpec((None, None, bf, d), lambda b, j, layer, c: (layer, step(j), chunks + c, 0)),
        pl.BlockSpec((None, None, d, bf), lambda b, j, layer, c: (layer, step(j), 0, c)),
        pl.BlockSpec((None, *w.heads.shape[1:]), lambda b, j, layer, c: (head(j), 0, 0), **mode),
    ]  # fmt: skip
    if not moshi:
        assert w.head0 is not None
        specs.append(once((None, *w.head0.shape[1:])))
    dq = w.num_heads * w.head_dim
    table = pl.BlockSpec((None, 1, dq), lambda b, j, layer, c: (j, 0, 0))
    specs += [table, table, once((dq, w.num_heads))]
    if widen:
        specs.append(once((w.kv_heads * w.head_dim, dq)))
    return specs


def head_matrices(w: DepthWeights) -> tuple[jax.Array, jax.Array | None]:
    """The 0/1 head-sum matrix [H hd, H] and (grouped heads) the widening [G hd, H hd]."""
    h, g, hd = w.num_heads, w.kv_heads, w.head_dim
    hsum = (jnp.arange(h * hd)[:, None] // hd == jnp.arange(h)[None]).astype(jnp.float32)
    if g == h:
        return hsum, None
    kv_of_lane = (jnp.arange(h * hd) // hd) // (h // g) * hd + jnp.arange(h * hd) % hd
    widen = (jnp.arange(g * hd)[:, None] == kv_of_lane[None]).astype(jnp.float32)
    return hsum, widen


def _nbytes(a: Any, shape: tuple[int, ...] | None = None) -> int:
    return 0 if a is None else math.prod(shape or a.shape) * jnp.dtype(a.dtype).itemsize


def vmem_bytes(w: DepthWeights, bt: int, bf: int, dtype: Any, single: bool = False) -> int:
    """VMEM the kernel asks for: the buffers of every input block (two: the pipeline's
    double buffering; one for the per-position and constant blocks with `single`), the
    output block and the scratch."""
    item, d = jnp.dtype(dtype).itemsize, w.dim
    dq, din = w.num_heads * w.head_dim, w.w_in.shape[-1]
    per_position = sum(_nbytes(a, a.shape[1:]) for a in (w.w_in, w.emb, w.heads))
    per_position += _nbytes(w.head0, None if w.head0 is None else w.head0.shape[1:])
    per_position += dq * (w.num_heads + dq) * 4  # the head-sum and widening matrices
    per_step = _nbytes(w.norm1, w.norm1.shape[1:]) * 2 + 2 * dq * 4
    per_step += _nbytes(w.wqkv, w.wqkv.shape[2:]) + _nbytes(w.wo, w.wo.shape[2:])
    per_step += 3 * _nbytes(w.w1, (bf, d)) + bt * (din + d) * item + bt * 3 * 4
    scratch = bt * d * (2 * item + 4) + 2 * w.layers * w.positions * bt * dq * item + bt * 4
    return (1 if single else 2) * per_position + 2 * per_step + 2 * w.positions * bt * 4 + scratch


def vmem_capacity() -> int:
    """This TPU's VMEM (64 MiB, the smallest of current chips, off a TPU)."""
    if jax.default_backend() == "tpu":
        return int(pltpu.get_tpu_info().vmem_capacity_bytes)
    return 64 * _MIB


def plan(
    w: DepthWeights, bt: int, dtype: Any, block_f: int | None, capacity: int
) -> tuple[int, bool]:
    """(MLP chunk, single-buffered per-position blocks) for a batch tile of `bt` rows that
    fits `capacity` bytes of VMEM: double buffers first, then smaller chunks."""
    first = hidden_block(w, block_f)
    chunks = [first] if block_f else [c for c in range(first, 0, -128) if w.hidden % c == 0]
    for bf in chunks:
        for single in (False, True):
            if vmem_bytes(w, bt, bf, dtype, single) + 4 * _MIB <= capacity:
                return bf, single
    need = vmem_bytes(w, bt, chunks[-1], dtype, True) / _MIB
    raise ValueError(
        f"depth kernel: a batch tile of {bt} rows needs {need:.1f} MiB of VMEM at the "
        f"smallest MLP chunk ({chunks[-1]}), more than the {capacity / _MIB:.0f} MiB there "
        "are; give a smaller block_b"
    )


def cost(w: DepthWeights, batch: int, tiles: int) -> pl.CostEstimate:
    """FLOPs, transcendentals and HBM bytes of one frame (every tile streams the weights)."""
    p, n, d, v = w.positions, w.layers, w.dim, w.vocab
    dq, din, f = w.num_heads * w.head_dim, w.w_in.shape[-1], w.hidden
    per_layer = w.wqkv.shape[2] * d + d * dq + 3 * f * d  # weights read per (position, layer)
    table = w.emb.shape[1] * w.emb.shape[2]
    macs = p * (d * din + table + n * per_layer + v * d) + n * p * p * dq * 2
    trans = p * (n * (p * w.num_heads + f) + 2 * v)
    layer_bytes = sum(_nbytes(a, a.shape[2:]) for a in (w.wqkv, w.wo, w.w1, w.w2))
    weights = p * (
        n * layer_bytes + _nbytes(w.w_in, w.w_in.shape[1:]) + _nbytes(w.emb, w.emb.shape[1:])
        + _nbytes(w.heads, w.heads.shape[1:])
    ) + _nbytes(w.head0)  # fmt: skip
    return pl.CostEstimate(
        flops=2 * batch * macs, transcendentals=batch * trans, bytes_accessed=tiles * weights
    )


def depth_frame_kernel(
    w: DepthWeights,
    h_bd: jax.Array,
    first_bd: jax.Array,
    seeds_b2: jax.Array,
    temp_b1: jax.Array,
    top_k_b1: jax.Array,
    *,
    greedy: bool,
    interpret: bool | Any = False,
    block_b: int | None = None,
    block_f: int | None = None,
    vmem_capacity_bytes: int | None = None,
) -> jax.Array:
    """`sfm.kernels.depth.depth_frame` as one kernel launch per batch tile: tokens [B, P].

    `interpret`: False compiles with Mosaic; True runs the TPU interpreter, as does a
    `pltpu.InterpretParams` (race detection). `block_b` / `block_f`: the
    batch tile and the MLP's hidden chunk (default: `block_rows`, `hidden_block`).
    `vmem_capacity_bytes` (default: this TPU's, `vmem_capacity`): where double buffers of
    the per-position blocks would not fit in it, they get one buffer."""
    dtype = h_bd.dtype
    batch, p = h_bd.shape[0], w.positions
    bt = block_rows(batch, dtype, block_b)
    padded = _round_up(batch, bt)

    def pad(a: jax.Array, value: Any = 0) -> jax.Array:
        return jnp.pad(a, ((0, padded - batch), (0, 0)), constant_values=value)

    hsum, widen = head_matrices(w)
    cos, sin = rope_tables(w)
    if w.emb.shape[0] == 0:  # one position: no previous token
        w = dataclasses.replace(w, emb=jnp.zeros((1, *w.emb.shape[1:]), w.emb.dtype))
    operands = [
        pad(h_bd), pad(first_bd.astype(dtype)), pad(seeds_b2.astype(jnp.int32)),
        pad(temp_b1.astype(jnp.float32)), pad(top_k_b1.astype(jnp.int32), 1),
        w.w_in, w.emb, w.norm1, w.wqkv, w.wo, w.norm2, w.w1, w.w1, w.w2, w.heads,
    ]  # fmt: skip
    if w.kind == "csm":
        operands.append(w.head0)
    operands += [cos, sin, hsum] + ([] if widen is None else [widen])
    dq = w.num_heads * w.head_dim
    bf, single = plan(w, bt, dtype, block_f, vmem_capacity_bytes or vmem_capacity())
    if interpret is True:
        interpret = pltpu.InterpretParams()
    kernel = functools.partial(_kernel, w=w, dtype=dtype, greedy=greedy, widen=widen is not None)
    tokens = pl.pallas_call(
        kernel,
        grid=(padded // bt, p, w.layers, w.hidden // bf),
        in_specs=_specs(w, bt, bf, widen is not None, single),
        out_specs=pl.BlockSpec((p, bt, 1), lambda b, j, layer, c: (0, b, 0)),
        out_shape=jax.ShapeDtypeStruct((p, padded, 1), jnp.int32),
        scratch_shapes=[
            pltpu.VMEM((bt, w.dim), dtype),  # the residual stream
            pltpu.VMEM((bt, w.dim), dtype),  # its norm, the MLP's input
            pltpu.VMEM((bt, w.dim), jnp.float32),  # the MLP's output, summed over chunks
            pltpu.VMEM((w.layers, p, bt, dq), dtype),  # keys of this frame
            pltpu.VMEM((w.layers, p, bt, dq), dtype),  # values
            pltpu.VMEM((bt, 1), jnp.int32),  # the previous token
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary", "arbitrary"),
            vmem_limit_bytes=vmem_bytes(w, bt, bf, dtype, single) + 4 * _MIB,
        ),
        cost_estimate=cost(w, padded, padded // bt),
        interpret=interpret or False,
        name=f"depth_frame_{w.kind}",
    )(*operands)
    return tokens[:, :batch, 0].T


__all__ = [
    "block_rows", "cost", "depth_frame_kernel", "head_matrices", "hidden_block", "sublanes",
    "vmem_bytes",
]  # fmt: skip
