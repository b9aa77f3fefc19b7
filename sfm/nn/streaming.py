"""The streaming-state protocol shared by every streaming module.

A streaming module exposes `init_state(batch) -> state` and `step(state, x) -> (state, y)`.
State is a pytree of fixed-size arrays whose leading axis is the batch, so one session of a
batch can be reset without touching the others, and the whole step can be jitted.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

State = Any


def reset_where(state: State, fresh: State, mask_b: jax.Array) -> State:
    """Replace the batch items where `mask_b` is true by the matching items of `fresh`."""

    def pick(old: jax.Array, new: jax.Array) -> jax.Array:
        m = mask_b.reshape((-1,) + (1,) * (old.ndim - 1))
        return jnp.where(m, new, old)

    return jax.tree.map(pick, state, fresh)
