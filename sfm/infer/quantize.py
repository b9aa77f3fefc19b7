"""Serving precision for the LM's weights: float32, bfloat16, or int8 weight-only.

`serving_leaves(lm, "int8")` returns the LM's flat parameter leaves with every linear kernel
([..., out, in], stacked layers and per-codebook weights included) stored as int8 with one
float32 scale per output channel (symmetric, scale = max |w| over `in` / 127) and every other
floating leaf in bfloat16. Inside the jitted step `dequantize` turns them back into arrays of
the LM's compute dtype, so the model code never sees the difference. Memory holds a quarter
of the float32 bytes; the time a memory-bound frame step saves depends on XLA fusing the
conversion into the matmul that reads the weight, which `bench/engine.py --sweep` measures
against bfloat16 on an accelerator::

    leaves = serving_leaves(lm, "int8")                     # int8 kernels in HBM
    model = static.model(dequantize(leaves, jnp.bfloat16))  # inside jit

Embeddings and norms are not quantized (they are a table lookup and a vector per layer).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sfm.infer.config import WEIGHT_FORMATS, WeightFormat

_INT8_MAX = 127.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """A kernel [..., out, in] as int8 values and a float32 scale per output channel."""

    q: jax.Array  # int8 [..., out, in]
    scale: jax.Array  # float32 [..., out, 1]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.scale.nbytes)

    def dequantize(self, dtype: Any) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


def quantize_int8(w: jax.Array) -> Int8Weight:
    """Symmetric per-output-channel int8 of a kernel [..., out, in]: |w - dequantized| is at
    most half a step (scale / 2) everywhere; an all-zero channel gets scale 1."""
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / _INT8_MAX, 1.0)
    q = jnp.clip(jnp.round(w / scale), -_INT8_MAX, _INT8_MAX).astype(jnp.int8)
    return Int8Weight(q, scale)


def _is_kernel(path: tuple[Any, ...]) -> bool:
    return any(getattr(k, "key", getattr(k, "name", None)) == "kernel" for k in path)


def serving_leaves(model: nnx.Module, weights: WeightFormat) -> list[Any]:
    """The model's flat parameter leaves (in `jax.tree.flatten` order of its nnx state) stored
    as `weights`; ValueError naming the option for an unknown format."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights: {weights!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    _, params = nnx.split(model)
    leaves: list[Any] = []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        if weights == "int8" and floating and x.ndim >= 2 and _is_kernel(path):
            leaves.append(quantize_int8(x))
        elif weights != "float32" and floating:
            leaves.append(jnp.asarray(x, jnp.bfloat16))
        else:
            leaves.append(x)
    return leaves


def dequantize(leaves: list[Any], dtype: Any) -> list[jax.Array]:
    """`serving_leaves` back to plain arrays: int8 kernels as `dtype`, the rest as stored."""
    return [x.dequantize(dtype) if isinstance(x, Int8Weight) else x for x in leaves]


def weight_bytes(leaves: list[Any]) -> int:
    """Bytes the leaves occupy (what a frame step reads once per token)."""
    return sum(int(x.nbytes) for x in leaves)
