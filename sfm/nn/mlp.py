"""Feed-forward blocks: plain (GELU) and gated (SiLU-GLU)."""

from __future__ import annotations

from typing import Any

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
    """linear_out(silu(a) * b) with [a, b] = linear_in(x): Moshi's SiLU gating, the one gated
    MLP of sfm. The two linears are given: `Linear`s (`gated_mlp`) or the LM's per-step
    `StepLinear`s; extra call arguments (the LM's weight steps) reach both."""

    def __init__(self, linear_in: nnx.Module, linear_out: nnx.Module) -> None:
        self.linear_in, self.linear_out = linear_in, linear_out

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        ab = self.linear_in(x, *args, **kwargs)
        hidden = ab.shape[-1] // 2
        a, b = ab[..., :hidden], ab[..., hidden:]
        return self.linear_out(jax.nn.silu(a) * b, *args, **kwargs)


def gated_mlp(dim: int, hidden: int, *, param_dtype: str = "float32", rngs: nnx.Rngs) -> GatedMlp:
    """A GatedMlp of plain linears: [embed, 2 * hidden] in, [hidden, embed] out."""
    kw: dict[str, Any] = dict(param_dtype=param_dtype, rngs=rngs)
    return GatedMlp(
        Linear(dim, 2 * hidden, axes=("embed", "mlp"), **kw),
        Linear(hidden, dim, axes=("mlp", "embed"), **kw),
    )
