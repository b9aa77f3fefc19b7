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
the input projection; per layer: RMSNorm, the q/k/v product (RoPE where set, csm's: the pair swap
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
from jax.experimental.pallas import mosaic_gpu as plgpu

from sfm.kernels.depth import DepthWeights, rope_tables
from sfm.kernels.depth_gpu_kernel import (
    BT,
    LOGITS_SMEM_BYTES,
    ROWS,
    f32,
    kernel,
    transforms,
)  # fmt: skip
from sfm.kernels.depth_plan import round_up


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


def runs_here() -> str | None:
    """Why this machine's GPUs cannot run the kernel (None when they can, or when the
    program is lowered on a host without a GPU, e.g. an export: it then targets Hopper).
    wgmma is Hopper's (compute capability 9.x): other GPUs keep the reference."""
    if jax.default_backend() != "gpu":
        return None
    for device in jax.local_devices():
        capability = str(getattr(device, "compute_capability", ""))
        if not capability.startswith("9."):
            return f"{device.device_kind} (compute capability {capability or '?'}) is not Hopper"
    return None


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
    global memory). The tile is fixed (BT sequences): the TPU kernel's `block_b` /
    `block_f` have no counterpart here."""
    dtype = h_bd.dtype
    if (why := supports(w, dtype)) is not None:
        raise ValueError(f"depth frame on the GPU kernel: {why}")
    if interpret is True:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        interpret = InterpretGPUParams()
    batch, p, csm, rope_on = h_bd.shape[0], w.positions, w.kind == "csm", w.max_period is not None
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
    if rope_on:
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
    tile_tf = transforms(ROWS, BT, dtype, interpreting)
    swap_tf = transforms(ROWS, ROWS, dtype, interpreting)
    scratch = [plgpu.SMEM((vp, BT), dtype, transforms=tile_tf)] * logits_in_smem  # logits
    scratch += [
        plgpu.SMEM((ROWS, BT), dtype, transforms=tile_tf),  # staging of elementwise tiles
        plgpu.SMEM((ROWS,), f32),  # staging of [64] vectors
    ]
    if rope_on:
        scratch += [
            plgpu.SMEM((ROWS, BT), dtype, transforms=tile_tf),  # RoPE's input to the pair swap
            plgpu.SMEM((ROWS, ROWS), dtype, transforms=swap_tf),  # the pair swap
        ]
    scratch += [
        plgpu.SMEM((p, BT), f32),  # attention scores of one head
        plgpu.SMEM((BT,), jnp.int32),  # the previous token
        plgpu.SMEM((p, BT), jnp.int32),  # the frame's tokens
        plgpu.SMEM((4 + p * scoring, BT), jnp.int32),  # this tile's sampling inputs
        plgpu.Barrier(num_arrivals=1),
    ]
    body = functools.partial(
        kernel, w=w, dtype=dtype, greedy=greedy, interpret=interpreting,
        logits_in_smem=logits_in_smem, scoring=scoring,
    )  # fmt: skip
    params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
    # Every operand and output stays in global memory; the kernel copies what it needs.
    tokens, *rest = plgpu.kernel(
        body, out_type=out_shape, scratch_types=scratch, grid=(padded // BT,),
        grid_names=("tiles",), compiler_params=params, interpret=interpret or None,
    )(*operands)  # fmt: skip
    if scoring:
        return tokens[:, :batch].T, rest[-1][:, : w.vocab, :batch].transpose(0, 2, 1).astype(f32)
    return tokens[:, :batch].T


__all__ = ["BT", "depth_frame_gpu", "runs_here", "supports"]
