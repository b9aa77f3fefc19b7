"""The temporal transformer's teacher-forced attention through JAX's own kernels.

Causal self-attention over positions 0..T-1 with an optional window of `context` keys:
splash attention on TPU (`jax.experimental.pallas.ops.tpu.splash_attention`: Mosaic, with
its backward kernels; a causal or local mask it skips whole blocks of) and cuDNN's fused
attention on GPU (`jax.nn.dot_product_attention(implementation="cudnn")`). Neither is ours
to maintain. Where the shapes suit neither (splash tiles the sequence in 128-row blocks of
128-wide heads), the caller's reference runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

_BLOCK = 128


def splash_supported(t: int, head_dim: int) -> bool:
    """Splash tiles the sequence in 128-row blocks of 128-wide heads."""
    return t % _BLOCK == 0 and head_dim % _BLOCK == 0


def cudnn_supported(head_dim: int, dtype: Any) -> bool:
    """cuDNN's fused attention takes 16-bit activations and heads up to 256 wide, in
    multiples of 8 (float32 models keep the reference)."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return half and head_dim % 8 == 0 and head_dim <= 256


@functools.lru_cache(maxsize=32)
def _splash(t: int, heads: int, context: int | None, interpret: bool) -> Callable[..., Any]:
    """A splash kernel for [H, T, D] queries of one sequence (vmapped over the batch)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    if context is None or context >= t:
        one = masks.CausalMask((t, t))
    else:
        one = masks.LocalMask((t, t), window_size=(context - 1, 0), offset=0)
    block = next(b for b in (512, 256, _BLOCK) if t % b == 0)  # divides T
    sizes = kernel.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    return kernel.make_splash_mha(
        masks.MultiHeadMask([one] * heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def any_kernel(t: int, head_dim: int, dtype: Any) -> bool:
    """Whether a kernel may serve this shape here (else the caller keeps its reference)."""
    on_gpu = jax.default_backend() == "gpu"
    return splash_supported(t, head_dim) or (on_gpu and cudnn_supported(head_dim, dtype))


def self_attention(
    q_bthd: jax.Array,
    k_btgd: jax.Array,
    v_btgd: jax.Array,
    *,
    context: int | None,
    fallback: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    interpret: bool | None = None,
) -> jax.Array:
    """Causal attention of positions 0..T-1 over themselves (the last `context` keys) ->
    [B, T, H * D] in v's dtype; q [B, T, H, D], k and v [B, T, G, D] (G divides H).

    The kernel is chosen where the program is lowered: splash on TPU (interpreted on CPU, or
    anywhere with `interpret`), cuDNN on NVIDIA GPUs; `fallback(q, k, v)` (the reference)
    where the shapes or dtype suit neither, and on other platforms."""
    t, d = q_bthd.shape[1], q_bthd.shape[-1]
    splash_ok = splash_supported(t, d)
    # JAX looks for cuDNN while tracing: a program lowered where no GPU is (an export for
    # GPU from a CPU host) keeps the reference on GPU.
    cudnn_ok = cudnn_supported(d, q_bthd.dtype) and jax.default_backend() == "gpu"
    args = (q_bthd, k_btgd, v_btgd)
    if interpret is not None:
        return _splash_call(*args, context=context, interpret=interpret)
    return jax.lax.platform_dependent(
        *args,
        tpu=partial(_splash_call, context=context, interpret=False) if splash_ok else fallback,
        cpu=partial(_splash_call, context=context, interpret=True) if splash_ok else fallback,
        cuda=partial(_cudnn_call, context=context) if cudnn_ok else fallback,
        default=fallback,
    )


def _cudnn_call(
    q_bthd: jax.Array, k_btgd: jax.Array, v_btgd: jax.Array, *, context: int | None
) -> jax.Array:
    b, t, h, d = q_bthd.shape
    window = None if context is None or context >= t else (context - 1, 0)
    out = jax.nn.dot_product_attention(
        q_bthd, k_btgd, v_btgd, is_causal=True, local_window_size=window,
        implementation="cudnn",
    )  # fmt: skip
    return out.reshape(b, t, h * d)


def _splash_call(
    q_bthd: jax.Array, k_btgd: jax.Array, v_btgd: jax.Array, *, context: int | None,
    interpret: bool,
) -> jax.Array:  # fmt: skip
    b, t, h, d = q_bthd.shape
    splash = _splash(t, h, context, interpret)
    q_bhtd = jnp.swapaxes(q_bthd * jnp.asarray(d**-0.5, q_bthd.dtype), 1, 2)
    k_bgtd, v_bgtd = jnp.swapaxes(k_btgd, 1, 2), jnp.swapaxes(v_btgd, 1, 2)
    out_bhtd = jax.vmap(splash)(q_bhtd, k_bgtd, v_bgtd)
    return jnp.swapaxes(out_bhtd, 1, 2).reshape(b, t, h * d).astype(v_btgd.dtype)


__all__ = ["any_kernel", "cudnn_supported", "self_attention", "splash_supported"]
