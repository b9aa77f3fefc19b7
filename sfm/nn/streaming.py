"""The streaming-state protocol shared by every streaming module.

A streaming module exposes `init_state(batch) -> state` and `step(state, x) -> (state, y)`.
State is a pytree of fixed-size arrays whose leading axis is the batch, so one session of a
batch can be reset without touching the others, and the whole step can be jitted.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

State = Any


def reset_where(state: State, fresh: State, mask_b: jax.Array) -> State:
    """Replace the batch items where `mask_b` is true by the matching items of `fresh`."""

    def pick(old: jax.Array, new: jax.Array) -> jax.Array:
        m = mask_b.reshape((-1,) + (1,) * (old.ndim - 1))
        return jnp.where(m, new, old)

    return jax.tree.map(pick, state, fresh)


class StaticModel:
    """A model's graphdef and param treedef as a static jit argument, hashed once: hashing a
    graphdef costs ~2 ms of Python, paid on every call if passed bare. Parameters travel
    beside it as a flat list of arrays (flattened in C++, not as an nnx.State)."""

    def __init__(self, graphdef: Any, treedef: Any) -> None:
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, StaticModel)
            and (self.graphdef, self.treedef) == (other.graphdef, other.treedef)
        )

    def model(self, leaves: list) -> Any:
        """The module rebuilt from the flat parameter leaves."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))
