"""The LM's depth transformer as `sfm.kernels.depth.DepthWeights`, and the frame's sampling
through `sfm.kernels.depth.depth_frame` (lm.attention_impl "pallas").

The arrays are the model's own (stacked layers [L, NW, out, in], the embedding tables), so
a frame copies nothing, except where the model's layout differs: adapters are folded in,
and a model without the layer scan has its layers stacked here, every frame (serve merged
adapters and the default `scan_layers`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sfm.kernels.depth import DepthWeights, depth_frame
from sfm.kernels.sampling import effective_top_k, seeds_of
from sfm.lm.layers import LayerStack, StepLinear
from sfm.lm.model import LM, CsmDepth


def _stacked(stack: LayerStack, pick: Any) -> jax.Array:
    """`pick(layer)` of every layer, [L, ...] (the scan's stacked arrays as they are)."""
    if stack.scan_layers:
        return pick(stack.layers)
    return jnp.stack([pick(layer) for layer in stack.layers])


def _kernel(linear: StepLinear) -> jax.Array:
    """A linear's weight sets [..., NW, out, in] with its adapter folded in."""
    if linear.lora_a is None:
        return linear.kernel[...]
    return linear.weights(linear.kernel[...].dtype)


def depth_weights(model: LM) -> DepthWeights:
    """The depth transformer of `model` (moshi or csm) for the fused frame."""
    depth, cfg = model.depth, model.cfg.depth
    stack = depth.transformer

    def norm(name: str) -> jax.Array:
        return _stacked(stack, lambda layer: getattr(layer, name).alpha[...])[:, None]

    common = dict(
        norm1=norm("norm1"),
        wqkv=_stacked(stack, lambda layer: _kernel(layer.self_attn.in_proj)),
        wo=_stacked(stack, lambda layer: _kernel(layer.self_attn.out_proj)),
        norm2=norm("norm2"),
        w1=_stacked(stack, lambda layer: _kernel(layer.gating.linear_in)),
        w2=_stacked(stack, lambda layer: _kernel(layer.gating.linear_out)),
        num_heads=cfg.num_heads,
        kv_heads=cfg.kv_heads,
        norm_eps=cfg.norm_eps,
        max_period=cfg.max_period,
    )
    if isinstance(depth, CsmDepth):
        n = model.cfg.dep_q
        return DepthWeights(
            w_in=_kernel(depth.proj),
            emb=tuple(model.emb[i].embedding[...] for i in range(n - 1)),
            heads=_kernel(depth.heads),
            head0=_kernel(depth.head0),
            kind="csm",
            **common,
        )
    return DepthWeights(
        w_in=_kernel(depth.depformer_in),
        emb=tuple(e.embedding[...] for e in depth.emb),
        heads=_kernel(depth.linears),
        head0=None,
        kind="moshi",
        **common,
    )


def fused_depth_tokens(
    model: LM,
    keys_b: jax.Array,
    h_bd: jax.Array,
    text_b: jax.Array,
    temp: float | jax.Array,
    top_k: int | jax.Array,
    *,
    greedy: bool,
    cap: int,
) -> jax.Array:
    """The dep_q codebooks [B, dep_q] of a frame in one fused call, sampled with the keys
    [B] (a frame's depth draw; the position picks within it); temp / top_k as
    `sfm.lm.generate.sample` reads them (engine-wide or per session, capped by `cap`)."""
    b = h_bd.shape[0]
    temp_b1 = jnp.broadcast_to(jnp.asarray(temp, jnp.float32), (b,)).reshape(b, 1)
    top_k_b = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (b,))
    greedy = greedy or (isinstance(temp, float | int) and temp <= 0)
    depth = model.depth
    first = (
        jnp.zeros((b, model.cfg.depth.dim), h_bd.dtype)
        if isinstance(depth, CsmDepth)
        else depth.text_emb(text_b, h_bd.dtype)
    )
    return depth_frame(
        depth_weights(model),
        h_bd,
        first,
        seeds_of(keys_b),
        temp_b1,
        effective_top_k(top_k_b, cap, model.cfg.card),
        greedy=greedy,
        impl="pallas",
    )


__all__ = ["depth_weights", "fused_depth_tokens"]
