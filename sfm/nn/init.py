"""Parameter initialisers that keep model construction fast.

Eager `jax.random` calls compile once per distinct shape, which makes building a model with
dozens of shapes take tens of seconds on CPU. These draw with numpy from a key of the
module's `params` stream instead (still reproducible from the seed); under a trace, where the
key is abstract (e.g. `nnx.eval_shape`), they fall back to `jax.random`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _generator(key: jax.Array) -> np.random.Generator | None:
    if isinstance(key, jax.core.Tracer):
        return None
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def uniform(rngs: nnx.Rngs, shape: tuple[int, ...], bound: float, dtype: str) -> jax.Array:
    """U(-bound, bound) of `shape` (PyTorch's default init with bound = 1/sqrt(fan_in))."""
    key = rngs.params()
    gen = _generator(key)
    if gen is None:
        return jax.random.uniform(key, shape, jnp.dtype(dtype), -bound, bound)
    return jnp.asarray(gen.uniform(-bound, bound, shape).astype(np.float32)).astype(dtype)


def normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: str = "float32") -> jax.Array:
    """Standard normal of `shape`."""
    key = rngs.params()
    gen = _generator(key)
    if gen is None:
        return jax.random.normal(key, shape, jnp.dtype(dtype))
    return jnp.asarray(gen.standard_normal(shape).astype(np.float32)).astype(dtype)


def logical(axes: tuple[str | None, ...]) -> dict[str, Any]:
    """Variable metadata naming the logical axis of each dimension (`nnx.Param(x, **logical(
    ("embed", "mlp")))`). Placement on a mesh comes later from the rules in `sfm.parallel`,
    never at creation (eager sharding off, whatever flax's global default)."""
    return {"out_sharding": axes, "eager_sharding": False}
