"""Feed-forward blocks: plain (GELU) and gated (SiLU-GLU)."""

from __future__ import annotations

import jax
from flax import nnx

from sfm.nn.linear import Linear


class Mlp(nnx.Module):
    """linear2(gelu(linear1(x))), no biases (Mimi's transformer)."""

    def __init__(self, dim: int, hidden: int, *, param_dtype: str = "float32", rngs: nnx.Rngs):
        self.linear1 = Linear(
            dim, hidden, axes=("embed", "mlp"), param_dtype=param_dtype, rngs=rngs
        )
        self.linear2 = Linear(
            hidden, dim, axes=("mlp", "embed"), param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear2(jax.nn.gelu(self.linear1(x), approximate=False))


class GatedMlp(nnx.Module):
    """linear_out(silu(a) * b) with [a, b] = linear_in(x) (Moshi's gating)."""

    def __init__(self, dim: int, hidden: int, *, param_dtype: str = "float32", rngs: nnx.Rngs):
        self.hidden = hidden
        self.linear_in = Linear(
            dim, 2 * hidden, axes=("embed", "mlp"), param_dtype=param_dtype, rngs=rngs
        )
        self.linear_out = Linear(
            hidden, dim, axes=("mlp", "embed"), param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        ab = self.linear_in(x)
        a, b = ab[..., : self.hidden], ab[..., self.hidden :]
        return self.linear_out(jax.nn.silu(a) * b)
