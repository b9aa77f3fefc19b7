"""The depth frame as one Pallas TPU (Mosaic) kernel: all P positions of a frame, every
layer, the heads and the sampling, in one launch per batch tile.

Grid (batch tile b, position j, layer l, MLP chunk c), run in that order on a core. The
weights of (j, l, c) are blocks that Pallas's pipeline fetches from HBM while the previous
step computes (double buffering); the frame's state stays in VMEM scratch across grid
steps: the residual stream x [Bt, D'], every layer's keys and values at every position
[L, P, Bt, H hd] and the previous token [Bt, 1]. At (l, c) = (0, 0) the position's input is
built: the projection of h and the previous token's embedding, a one-hot product with the
position's table, which is copied from HBM into VMEM there (the tables stay the model's own
arrays: nothing is stacked per frame). At c = 0 a layer's attention runs; each c adds one
chunk of the gated MLP's hidden units (summed in float32); at the last (l, c) the position's
head runs and its token is sampled (`sfm.kernels.sampling`) into the output and into the next
position's input. Batch tiles are independent ("parallel": split over a megacore's cores);
`sfm.kernels.depth_plan` sizes them and the chunks to the chip's VMEM.

Attention over the <= P keys of a position works on whole [P, Bt, H hd] blocks: the per-head
sums of q * k and the spreading of per-head weights back to lanes are products with a 0/1
head-sum matrix, so nothing is reshaped across lanes; keys and values of grouped heads are
widened to all H heads once, when written (a 0/1 product too). RoPE's pair swap is two lane
rotations. Keys at positions past j (an earlier frame's or tile's) are masked out.

Rounding follows the model's: products take operands in the compute dtype and accumulate in
float32, and their results (projections, attention scores, the MLP's halves, the heads'
logits) are rounded to the compute dtype where the model's are; float32 products run at
full precision (the 0/1 products stay exact).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sfm.kernels.depth import DepthWeights, rms_norm, rope_tables
from sfm.kernels.depth_plan import cost, plan, round_up, vmem_capacity
from sfm.kernels.sampling import sample_rows


def _precision(dtype: Any) -> jax.lax.Precision:
    return (
        jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT
    )


def _dot(x: jax.Array, y: jax.Array, dtype: Any, transpose_y: bool = False) -> jax.Array:
    """x @ y (or x @ y.T), operands in `dtype`, float32 result."""
    dims = (((1,), (1 if transpose_y else 0,)), ((), ()))
    return jax.lax.dot_general(
        x.astype(dtype), y.astype(dtype), dims, precision=_precision(dtype),
        preferred_element_type=jnp.float32,
    )  # fmt: skip


def _dense(x: jax.Array, w_oi: jax.Array, dtype: Any) -> jax.Array:
    """x [B, in] @ w.T rounded to `dtype` (a linear layer of the model) -> float32."""
    return _dot(x, w_oi, dtype, transpose_y=True).astype(dtype).astype(jnp.float32)


def _swap_pairs(x: jax.Array) -> jax.Array:
    """Adjacent lane pairs (a, b) -> (b, a) of a [rows, n] block: two lane rotations."""
    n = x.shape[-1]
    lane = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.where(lane % 2 == 0, pltpu.roll(x, n - 1, 1), pltpu.roll(x, 1, 1))


def _kernel(
    *refs: Any, w: DepthWeights, dtype: Any, greedy: bool, widen: bool, scoring: bool
) -> None:
    csm, n_tables = w.kind == "csm", len(w.emb)
    it = iter(refs)
    h_ref, first_ref, seeds_ref, temp_ref, topk_ref = (next(it) for _ in range(5))
    w_in_ref, n1_ref, wqkv_ref, wo_ref, n2_ref, w1a_ref, w1b_ref, w2_ref, heads_ref = (
        next(it) for _ in range(9)
    )
    head0_ref = next(it) if csm else None
    cos_ref, sin_ref, hsum_ref = next(it), next(it), next(it)
    widen_ref = next(it) if widen else None
    table_refs = [next(it) for _ in range(n_tables)]  # in HBM
    given_ref = next(it) if scoring else None
    out_ref = next(it)
    logits_ref = next(it) if scoring else None
    x_sc, xn_sc, acc_sc, k_sc, v_sc, prev_sc = (next(it) for _ in range(6))
    table_sc = next(it) if n_tables else None

    j, layer, chunk = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    p, bt, n_layers, n_chunks = k_sc.shape[1], x_sc.shape[0], w.layers, pl.num_programs(3)
    h, hd = w.num_heads, w.head_dim
    dq, dk = h * hd, w.kv_heads * hd
    f32 = jnp.float32

    @pl.when((layer == 0) & (chunk == 0))
    def _position_input() -> None:
        if table_sc is None:  # one position: the input is h alone
            e = jnp.zeros((bt, w.dim if not csm else h_ref.shape[-1]), f32)
        else:
            for i, table in enumerate(table_refs):  # flat, not a nested switch: Mosaic
                pl.when(j == i + 1)(functools.partial(pltpu.sync_copy, table, table_sc))
            lanes = jax.lax.broadcasted_iota(jnp.int32, (bt, table_sc.shape[0]), 1)
            e = _dot(lanes == prev_sc[...], table_sc[...], dtype)  # a row gather
        if csm:
            x = _dense(jnp.where(j == 0, h_ref[...].astype(f32), e), w_in_ref[...], dtype)
        else:
            x = _dense(h_ref[...], w_in_ref[...], dtype)
            x = x + jnp.where(j == 0, first_ref[...].astype(f32), e)
        x_sc[...] = x.astype(x_sc.dtype)

    @pl.when(chunk == 0)
    def _attention() -> None:
        x = x_sc[...]
        xn = rms_norm(x, n1_ref[...], w.norm_eps)
        q = _dense(xn, wqkv_ref[pl.ds(0, dq), :], dtype)
        k = _dense(xn, wqkv_ref[pl.ds(dq, dk), :], dtype)
        v = _dense(xn, wqkv_ref[pl.ds(dq + dk, dk), :], dtype)
        if w.max_period is not None:
            cos, sin = cos_ref[...], sin_ref[...]
            q = q * cos + _swap_pairs(q) * sin
            k = k * cos[:, :dk] + _swap_pairs(k) * sin[:, :dk]
        if widen_ref is not None:  # grouped heads -> all H heads (exact: a 0/1 product)
            k, v = _dot(k, widen_ref[...], dtype), _dot(v, widen_ref[...], dtype)
        k_sc[layer, j] = k.astype(k_sc.dtype)
        v_sc[layer, j] = v.astype(v_sc.dtype)

        visible = jax.lax.broadcasted_iota(jnp.int32, (p, bt, dq), 0) <= j
        q32 = q.astype(dtype).astype(f32)
        qk = jnp.where(visible, k_sc[layer].astype(f32) * q32[None], 0.0)
        scores = _dot(qk.reshape(p * bt, dq), hsum_ref[...], f32).astype(dtype).astype(f32)
        scores = scores.reshape(p, bt, h) * hd**-0.5
        seen = jax.lax.broadcasted_iota(jnp.int32, (p, bt, h), 0) <= j
        scores = jnp.where(seen, scores, -jnp.inf)
        probs = jnp.exp(scores - jnp.max(scores, axis=0, keepdims=True))
        probs = (probs / jnp.sum(probs, axis=0, keepdims=True)).astype(dtype).astype(f32)
        spread = _dot(probs.reshape(p * bt, h), hsum_ref[...], f32, transpose_y=True)
        values = v_sc[layer].astype(f32)
        attn = jnp.sum(jnp.where(visible, spread.reshape(p, bt, dq) * values, 0.0), axis=0)
        x = (x + _dense(attn.astype(dtype), wo_ref[...], dtype).astype(dtype)).astype(dtype)
        x_sc[...] = x.astype(x_sc.dtype)
        xn_sc[...] = rms_norm(x, n2_ref[...], w.norm_eps).astype(xn_sc.dtype)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    # One chunk of the gated MLP's hidden units; the output sums in float32 over chunks.
    xn = xn_sc[...]
    a = _dense(xn, w1a_ref[...], dtype).astype(dtype)
    b = _dense(xn, w1b_ref[...], dtype).astype(dtype)
    acc_sc[...] += _dot((jax.nn.silu(a) * b).astype(dtype), w2_ref[...], dtype, transpose_y=True)

    def emit(logits: jax.Array) -> None:
        token = sample_rows(logits, seeds_ref[...], j, temp_ref[...], topk_ref[...], greedy=greedy)
        out_ref[j] = token
        if given_ref is None:
            prev_sc[...] = token
        else:  # scoring given tokens: they are fed on, the logits kept
            assert logits_ref is not None
            prev_sc[...] = given_ref[j]
            logits_ref[j] = logits

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


def _specs(w: DepthWeights, bt: int, bf: int, widen: bool, single: bool) -> list[pl.BlockSpec]:
    """Input block specs over the grid (b, j, l, c), in the kernel's operand order. With
    `single`, the blocks that change once per position (input projection, heads) and the
    constant ones get one buffer instead of two; the embedding tables stay in HBM."""
    moshi = w.kind == "moshi"
    mode = dict(pipeline_mode=pl.Buffered(1)) if single else {}
    chunks = w.hidden // bf

    def step(j: Any) -> Any:
        return j if moshi else 0

    def head(j: Any) -> Any:
        return j if moshi else jnp.maximum(j - 1, 0)

    def rows(width: int) -> pl.BlockSpec:
        return pl.BlockSpec((bt, width), lambda b, j, layer, c: (b, 0))

    def per_layer(shape: tuple[int, ...], index: Any) -> pl.BlockSpec:
        return pl.BlockSpec((None, None, *shape), index)

    def once(shape: tuple[int, ...]) -> pl.BlockSpec:  # the same block all along
        return pl.BlockSpec(shape, lambda b, j, layer, c: (0,) * len(shape), **mode)

    d = w.dim
    norm = pl.BlockSpec((None, 1, d), lambda b, j, layer, c: (layer, 0, 0))
    specs = [
        rows(w.w_in.shape[-1]), rows(d), rows(2), rows(1), rows(1),
        pl.BlockSpec((None, *w.w_in.shape[1:]), lambda b, j, layer, c: (step(j), 0, 0), **mode),
        norm,
        per_layer(w.wqkv.shape[2:], lambda b, j, layer, c: (layer, step(j), 0, 0)),
        per_layer(w.wo.shape[2:], lambda b, j, layer, c: (layer, step(j), 0, 0)),
        norm,
        per_layer((bf, d), lambda b, j, layer, c: (layer, step(j), c, 0)),
        per_layer((bf, d), lambda b, j, layer, c: (layer, step(j), chunks + c, 0)),
        per_layer((d, bf), lambda b, j, layer, c: (layer, step(j), 0, c)),
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
    return specs + [pl.BlockSpec(memory_space=pl.ANY)] * len(w.emb)


def head_matrices(w: DepthWeights) -> tuple[jax.Array, jax.Array | None]:
    """The 0/1 head-sum matrix [H hd, H] and (grouped heads) the widening [G hd, H hd]."""
    h, g, hd = w.num_heads, w.kv_heads, w.head_dim
    hsum = (jnp.arange(h * hd)[:, None] // hd == jnp.arange(h)[None]).astype(jnp.float32)
    if g == h:
        return hsum, None
    kv_of_lane = (jnp.arange(h * hd) // hd) // (h // g) * hd + jnp.arange(h * hd) % hd
    widen = (jnp.arange(g * hd)[:, None] == kv_of_lane[None]).astype(jnp.float32)
    return hsum, widen


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
    given_bp: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`sfm.kernels.depth.depth_frame` as one kernel launch per batch tile: tokens [B, P].

    `interpret`: False compiles with Mosaic; True runs the TPU interpreter, as does a
    `pltpu.InterpretParams` (race detection); "hlo" Pallas's generic interpreter (no side
    effects: it lowers inside `jax.lax.platform_dependent` beside the device kernels).
    `block_b` / `block_f` fix the batch tile and the MLP chunk; by default
    `sfm.kernels.depth_plan.plan` fits them to `vmem_capacity_bytes` (default: this TPU's,
    `vmem_capacity`). `given_bp` [B, P]: see `sfm.kernels.depth.depth_frame`."""
    dtype = h_bd.dtype
    batch, p = h_bd.shape[0], w.positions
    capacity = vmem_capacity_bytes or vmem_capacity()
    fit = plan(w, batch, dtype, capacity, block_b, block_f)
    bt, bf = fit.rows, fit.chunk
    padded = round_up(batch, bt)

    def pad(a: jax.Array, value: Any = 0) -> jax.Array:
        return jnp.pad(a, ((0, padded - batch), (0, 0)), constant_values=value)

    hsum, widen = head_matrices(w)
    cos, sin = rope_tables(w)
    operands = [
        pad(h_bd), pad(first_bd.astype(dtype)), pad(seeds_b2.astype(jnp.int32)),
        pad(temp_b1.astype(jnp.float32)), pad(top_k_b1.astype(jnp.int32), 1),
        w.w_in, w.norm1, w.wqkv, w.wo, w.norm2, w.w1, w.w1, w.w2, w.heads,
    ]  # fmt: skip
    if w.kind == "csm":
        operands.append(w.head0)
    operands += [cos, sin, hsum] + ([] if widen is None else [widen]) + list(w.emb)
    scoring = given_bp is not None
    if scoring:
        operands.append(pad(given_bp.astype(jnp.int32)).T[:, :, None])  # [P, B, 1]
    dq = w.num_heads * w.head_dim
    if interpret is True:
        interpret = pltpu.InterpretParams()
    elif interpret == "hlo":
        interpret = True  # pallas_call's own: the kernel discharged into plain JAX
    kernel = functools.partial(
        _kernel, w=w, dtype=dtype, greedy=greedy, widen=widen is not None, scoring=scoring
    )
    column = pl.BlockSpec((p, bt, 1), lambda b, j, layer, c: (0, b, 0))
    in_specs = _specs(w, bt, bf, widen is not None, fit.single) + [column] * scoring
    out_specs: Any = column
    out_shape: Any = jax.ShapeDtypeStruct((p, padded, 1), jnp.int32)
    if scoring:
        v = w.vocab
        out_specs = (column, pl.BlockSpec((p, bt, v), lambda b, j, layer, c: (0, b, 0)))
        out_shape = (out_shape, jax.ShapeDtypeStruct((p, padded, v), jnp.float32))
    scratch = [
        pltpu.VMEM((bt, w.dim), dtype),  # the residual stream
        pltpu.VMEM((bt, w.dim), dtype),  # its norm, the MLP's input
        pltpu.VMEM((bt, w.dim), jnp.float32),  # the MLP's output, summed over chunks
        pltpu.VMEM((w.layers, p, bt, dq), dtype),  # keys of this frame
        pltpu.VMEM((w.layers, p, bt, dq), dtype),  # values
        pltpu.VMEM((bt, 1), jnp.int32),  # the previous token
    ]
    if w.emb:
        scratch.append(pltpu.VMEM(w.emb[0].shape, w.emb[0].dtype))  # this position's table
    out = pl.pallas_call(
        kernel,
        grid=(padded // bt, p, w.layers, w.hidden // bf),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary", "arbitrary"),
            vmem_limit_bytes=min(capacity, fit.vmem_bytes + 4 * (1 << 20)),
        ),
        cost_estimate=cost(w, padded, padded // bt),
        interpret=interpret or False,
        name=f"depth_frame_{w.kind}",
    )(*operands)
    if scoring:
        return out[0][:, :batch, 0].T, out[1][:, :batch]
    return out[:, :batch, 0].T


__all__ = ["depth_frame_kernel", "head_matrices"]
