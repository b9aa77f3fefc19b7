"""Normalisations over the last axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sfm.nn.init import logical


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, computed in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype: str = "float32") -> None:
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **logical(("norm",)))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), **logical(("norm",)))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm, y = x * alpha / sqrt(mean(x^2) + eps), computed in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-8, param_dtype: str = "float32") -> None:
        self.eps = eps
        self.alpha = nnx.Param(jnp.ones((dim,), param_dtype), **logical(("norm",)))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = self.eps + jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return (x32 * (self.alpha[...].astype(jnp.float32) * jax.lax.rsqrt(var))).astype(x.dtype)
