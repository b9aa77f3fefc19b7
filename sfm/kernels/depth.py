"""The depth transformer's frame: all codebook steps of one frame, with their sampling.

`depth_frame(w, h_bd, first_bd, seeds, temp, top_k)` runs the depth transformer over the
P positions of a frame for a batch, sampling each position's token and feeding its embedding
to the next position. Two variants share the math (`DepthWeights.kind`):

- "moshi": position k predicts codebook k with its own weights (input projection, every
  linear of every layer, output head); its input is proj_k(h) + emb_k(previous token), the
  previous token of position 0 being the frame's text token (its embedding `first_bd` comes
  from outside: the text vocabulary is the temporal model's). No positional embedding.
- "csm": codebook 0 comes from a head on h; position 0 of the shared decoder reads proj(h),
  position k >= 1 reads proj(emb_{k-1}(c_{k-1})) (the temporal model's tables) with RoPE
  over the position, and its per-codebook head predicts c_k.

`reference` is plain JAX (the definition); `sfm.kernels.depth_tpu` is the fused Pallas TPU
kernel (one launch per batch tile for all P steps), `sfm.kernels.depth_gpu` its Mosaic GPU
counterpart. All sample with `sfm.kernels.sampling` (the GPU kernel column-wise,
`sfm.kernels.sampling_gpu`) so their tokens compare exactly. Weights are passed as the
model stores them (any float dtype, cast to the compute dtype where they are read); the
layout is the LM's: kernels
[out, in], stacked layers first, per-step weight sets second.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp

from sfm.kernels.sampling import sample_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DepthWeights:
    """The depth transformer of one LM, as arrays (see the module docstring).

    P positions, L layers, NW per-step weight sets (moshi P, csm 1), D' = dim, Din = the
    temporal dim, V = card, H / G query / kv heads of width hd, F the gated hidden width.

    w_in   [NW, D', Din]            input projection (csm: `proj`)
    emb    P - 1 tables [V + 1, De]  of the previous token at positions 1.. (moshi: De = D';
                                    csm: the temporal model's tables, De = Din)
    norm1, norm2 [L, 1, D']         RMSNorm scales (shared by the steps)
    wqkv   [L, NW, (H + 2G) hd, D'] fused [q | k | v] projection
    wo     [L, NW, D', H hd]
    w1     [L, NW, 2F, D']          gated MLP in ([a | b]: silu(a) * b)
    w2     [L, NW, D', F]
    heads  [NH, V, D']              output heads (moshi: P; csm: P - 1, position k uses k - 1)
    head0  [1, V, Din] or None      csm: codebook 0's head on h
    """

    w_in: jax.Array
    emb: tuple[jax.Array, ...]
    norm1: jax.Array
    wqkv: jax.Array
    wo: jax.Array
    norm2: jax.Array
    w1: jax.Array
    w2: jax.Array
    heads: jax.Array
    head0: jax.Array | None
    kind: Literal["moshi", "csm"] = dataclasses.field(metadata=dict(static=True))
    num_heads: int = dataclasses.field(metadata=dict(static=True))
    kv_heads: int = dataclasses.field(metadata=dict(static=True))
    norm_eps: float = dataclasses.field(metadata=dict(static=True))
    max_period: float | None = dataclasses.field(metadata=dict(static=True))

    @property
    def positions(self) -> int:
        return len(self.emb) + 1

    @property
    def layers(self) -> int:
        return self.wqkv.shape[0]

    @property
    def dim(self) -> int:
        return self.wqkv.shape[-1]

    @property
    def head_dim(self) -> int:
        return self.wo.shape[-1] // self.num_heads

    @property
    def hidden(self) -> int:
        return self.w2.shape[-1]

    @property
    def vocab(self) -> int:
        return self.heads.shape[1]

    def step_set(self, position: int) -> int:
        """The per-step weight set position `position` reads (csm: the shared one)."""
        return position if self.kind == "moshi" else 0

    def head_of(self, position: int) -> int:
        return position if self.kind == "moshi" else max(position - 1, 0)


def rope_tables(w: DepthWeights) -> tuple[jax.Array, jax.Array]:
    """cos, sin [P, 1, H hd] float32 of RoPE at positions 0..P-1 (interleaved pairs, the
    same angle on both lanes of a pair; sin carries the sign of the rotation: -sin on the
    first lane of a pair, +sin on the second). Identity tables without RoPE."""
    p, hd, h = w.positions, w.head_dim, w.num_heads
    if w.max_period is None:
        return jnp.ones((p, 1, h * hd), jnp.float32), jnp.zeros((p, 1, h * hd), jnp.float32)
    freqs = jnp.exp(jnp.arange(hd // 2, dtype=jnp.float32) * (-math.log(w.max_period) * 2 / hd))
    angles = jnp.arange(p, dtype=jnp.float32)[:, None] * jnp.repeat(freqs, 2)[None]  # [P, hd]
    sign = jnp.tile(jnp.array([-1.0, 1.0], jnp.float32), hd // 2)
    cos, sin = jnp.cos(angles), jnp.sin(angles) * sign
    return jnp.tile(cos, (1, h))[:, None], jnp.tile(sin, (1, h))[:, None]


def swap_pairs(x: jax.Array) -> jax.Array:
    """[..., 2n]: every adjacent pair (a, b) -> (b, a)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return pairs[..., ::-1].reshape(x.shape)


def rms_norm(x: jax.Array, alpha: jax.Array, eps: float) -> jax.Array:
    """RMS normalisation in float32, scaled by `alpha` (the kernels' and the reference's)."""
    x32 = x.astype(jnp.float32)
    var = eps + jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return x32 * (alpha.astype(jnp.float32) * jax.lax.rsqrt(var))


def _dense(x: jax.Array, w_oi: jax.Array, dtype: Any) -> jax.Array:
    """x [B, in] @ w.T in `dtype` (float32 accumulation, result rounded to `dtype`, as a
    linear layer of the model) -> [B, out] float32."""
    y = jnp.einsum(
        "bi,oi->bo", x.astype(dtype), w_oi.astype(dtype), preferred_element_type=jnp.float32
    )
    return y.astype(dtype).astype(jnp.float32)


def reference(
    w: DepthWeights,
    h_bd: jax.Array,
    first_bd: jax.Array,
    seeds_b2: jax.Array,
    temp_b1: jax.Array,
    top_k_b1: jax.Array,
    *,
    greedy: bool,
    given_bp: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Tokens [B, P] int32 of one frame (see `depth_frame`), in plain JAX.

    Rounded to h's dtype where the model rounds (the result of every product: projections,
    attention scores, the MLP's halves, logits; the residual stream); accumulations, norms,
    RoPE and softmax are float32."""
    dtype, f32 = h_bd.dtype, jnp.float32
    b, p, n_layers = h_bd.shape[0], w.positions, w.layers
    h, g, hd = w.num_heads, w.kv_heads, w.head_dim
    cos, sin = rope_tables(w)
    keys: list[list[jax.Array]] = [[] for _ in range(n_layers)]
    values: list[list[jax.Array]] = [[] for _ in range(n_layers)]
    tokens: list[jax.Array] = []
    scores_pbv: list[jax.Array] = []
    prev = jnp.zeros((b, 1), jnp.int32)
    for j in range(p):
        s = w.step_set(j)
        e = None if j == 0 else jnp.take(w.emb[j - 1], prev[:, 0], axis=0).astype(dtype)
        if w.kind == "csm":
            x = _dense(h_bd if e is None else e, w.w_in[s], dtype)
        else:
            x = _dense(h_bd, w.w_in[s], dtype) + (first_bd if e is None else e).astype(f32)
        x = x.astype(dtype)
        for layer in range(n_layers):
            xn = rms_norm(x, w.norm1[layer, 0], w.norm_eps)
            qkv = _dense(xn, w.wqkv[layer, s], dtype)
            q, k, v = qkv[:, : h * hd], qkv[:, h * hd : (h + g) * hd], qkv[:, (h + g) * hd :]
            q = q * cos[j] + swap_pairs(q) * sin[j]
            k = k * cos[j, :, : g * hd] + swap_pairs(k) * sin[j, :, : g * hd]
            keys[layer].append(k.astype(dtype))
            values[layer].append(v.astype(dtype))
            k_all = jnp.stack(keys[layer], 1).reshape(b, j + 1, g, 1, hd)
            v_all = jnp.stack(values[layer], 1).reshape(b, j + 1, g, 1, hd)
            q_g = q.astype(dtype).reshape(b, g, h // g, hd)
            scores = jnp.einsum("bgrd,bjgod->bgrj", q_g, k_all, preferred_element_type=f32)
            probs = jax.nn.softmax(scores.astype(dtype).astype(f32) * hd**-0.5, axis=-1)
            attn = jnp.einsum(
                "bgrj,bjgod->bgrd", probs.astype(dtype), v_all, preferred_element_type=f32
            )
            attn = attn.astype(dtype).reshape(b, h * hd)
            x = (x + _dense(attn, w.wo[layer, s], dtype).astype(dtype)).astype(dtype)
            ab = _dense(rms_norm(x, w.norm2[layer, 0], w.norm_eps), w.w1[layer, s], dtype)
            f = w.hidden
            mid = (jax.nn.silu(ab[:, :f].astype(dtype)) * ab[:, f:].astype(dtype)).astype(dtype)
            x = (x + _dense(mid, w.w2[layer, s], dtype).astype(dtype)).astype(dtype)
        if w.kind == "csm" and j == 0:
            assert w.head0 is not None
            logits = _dense(h_bd, w.head0[0], dtype)
        else:
            logits = _dense(x, w.heads[w.head_of(j)], dtype)
        prev = sample_rows(logits, seeds_b2, j, temp_b1, top_k_b1, greedy=greedy)
        tokens.append(prev)
        scores_pbv.append(logits)
        if given_bp is not None:
            prev = given_bp[:, j : j + 1].astype(jnp.int32)
    if given_bp is not None:
        return jnp.concatenate(tokens, axis=1), jnp.stack(scores_pbv)
    return jnp.concatenate(tokens, axis=1)


Impl = Literal["xla", "pallas"]


def depth_frame(
    w: DepthWeights,
    h_bd: jax.Array,
    first_bd: jax.Array,
    seeds_b2: jax.Array,
    temp_b1: jax.Array,
    top_k_b1: jax.Array,
    *,
    greedy: bool,
    impl: Impl = "xla",
    interpret: bool | str | Any | None = None,
    block_b: int | None = None,
    block_f: int | None = None,
    given_bp: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Tokens [B, P] int32 of one frame for h [B, Din] (the temporal output), first [B, D']
    (moshi: the text token's depth embedding; csm: unused), seeds [B, 2] int32, temperatures
    [B, 1] float32 (<= 0: argmax) and top-k [B, 1] int32 in [1, V] (see
    `sfm.kernels.sampling`). impl "xla" is `reference`; "pallas" the fused kernel
    (`interpret`: None picks by the platform the program is lowered for, see below; True
    or `pltpu.InterpretParams` the TPU kernel in the TPU interpreter, "hlo" in Pallas's
    generic one; False Mosaic).

    Scoring: with `given_bp` [B, P] those tokens are fed on instead of the sampled ones and
    (tokens, logits [P, B, V] float32) come back: the frame's logits given its codes."""
    args = (w, h_bd, first_bd, seeds_b2, temp_b1, top_k_b1)
    if impl == "xla":
        return reference(*args, greedy=greedy, given_bp=given_bp)
    if impl != "pallas":
        raise ValueError(f"depth impl {impl!r}: expected xla or pallas")
    from sfm.kernels.depth_tpu import depth_frame_kernel

    kernel = partial(
        depth_frame_kernel, greedy=greedy, block_b=block_b, block_f=block_f, given_bp=given_bp
    )
    if interpret is not None:
        return kernel(*args, interpret=interpret)
    from sfm.kernels.depth_gpu import depth_frame_gpu, runs_here, supports
    from sfm.kernels.depth_plan import plan, vmem_capacity

    xla = partial(reference, greedy=greedy, given_bp=given_bp)
    tpu, cpu = partial(kernel, interpret=False), partial(kernel, interpret="hlo")
    try:  # a frame the TPU kernel cannot fit in VMEM runs the reference there
        plan(w, h_bd.shape[0], h_bd.dtype, vmem_capacity(), block_b, block_f)
    except ValueError:
        tpu = cpu = xla
    gpu = xla  # float32, odd sizes, GPUs before Hopper: the reference (see `depth_gpu`)
    if supports(w, h_bd.dtype) is None and runs_here() is None:
        gpu = partial(depth_frame_gpu, greedy=greedy, given_bp=given_bp)
    # Chosen where the program is lowered (an ahead-of-time compile on a CPU host gets the
    # target's kernel): TPU the Mosaic kernel, CUDA GPUs the Mosaic GPU kernel, CPU the TPU
    # kernel in Pallas's generic interpreter (free of side effects, which would otherwise
    # stop the other branches lowering), anything else the reference. A Pallas kernel lowers
    # for its own platform only: an export for several platforms at once uses impl "xla".
    return jax.lax.platform_dependent(*args, tpu=tpu, cuda=gpu, cpu=cpu, default=xla)


__all__ = ["DepthWeights", "Impl", "depth_frame", "reference", "rope_tables", "swap_pairs"]
