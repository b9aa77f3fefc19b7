"""The sfm weight format: every Variable of an NNX module in one safetensors file, keyed by
its state path (`layers/0/kernel`), with the run's config YAML in the metadata."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from sfm.io.tensors import CheckpointError, PathLike, read_metadata, read_tensors, write_tensors

CONFIG_KEY = "sfm_config"


def _key(path: tuple[Any, ...]) -> str:
    """Join a state path into a flat key: ('layers', 0, 'kernel') -> 'layers/0/kernel'."""
    return "/".join(str(p) for p in path)


def _variables(model: nnx.Module) -> Iterator[tuple[str, nnx.Variable]]:
    """Yield (flat key, Variable) for every Variable of `model`, parameters and buffers."""
    for path, var in nnx.to_flat_state(nnx.state(model)):
        yield _key(path), var


def _is_prng_key(value: Any) -> bool:
    """True for typed PRNG key arrays, which are stored as their raw key data."""
    return isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)


def _to_numpy(value: Any) -> np.ndarray:
    """A Variable's value as a host numpy array (typed keys as their uint32 data)."""
    if _is_prng_key(value):
        value = jax.random.key_data(value)
    return np.array(value, order="C")


def save_params(model: nnx.Module, path: PathLike, config_yaml: str) -> None:
    """Write all of `model`'s Variables to `path`, with `config_yaml` in the file's metadata."""
    tensors = {key: _to_numpy(var.get_value()) for key, var in _variables(model)}
    write_tensors(path, tensors, {CONFIG_KEY: config_yaml})


def read_config_yaml(path: PathLike) -> str | None:
    """The config YAML stored in a checkpoint's metadata, or None when it has none."""
    return read_metadata(path).get(CONFIG_KEY)


def _mismatches(expected: dict[str, tuple[int, ...]], found: dict[str, np.ndarray]) -> list[str]:
    """Describe every key that is missing, unexpected, or of the wrong shape, model order first."""
    problems = []
    for key, shape in expected.items():
        if key not in found:
            problems.append(f"key '{key}' is missing (expected shape {shape})")
        elif tuple(found[key].shape) != shape:
            problems.append(f"key '{key}' expected shape {shape}, found {tuple(found[key].shape)}")
    for key, arr in sorted(found.items()):
        if key not in expected:
            problems.append(
                f"unexpected key '{key}' (shape {tuple(arr.shape)}) is not in the model"
            )
    return problems


def _expected_shape(value: Any) -> tuple[int, ...]:
    """The stored shape of a Variable's value (typed keys include the key-data dimension)."""
    return tuple(jax.random.key_data(value).shape if _is_prng_key(value) else np.shape(value))


def _assign(var: nnx.Variable, arr: np.ndarray) -> None:
    """Set `var` from `arr`, keeping the Variable's dtype, key type and sharding."""
    old = var.get_value()
    if _is_prng_key(old):
        new = jax.random.wrap_key_data(arr, impl=jax.random.key_impl(old))
    else:
        new = jax.numpy.asarray(arr, dtype=old.dtype)
    if isinstance(old, jax.Array) and old.committed:  # uncommitted stays so: no recompiles
        new = jax.device_put(new, old.sharding)
    var.set_value(new)


def load_params(model: nnx.Module, path: PathLike) -> None:
    """Load `path` into an already-built `model`; keys and shapes must match it exactly."""
    found = read_tensors(path)
    variables = dict(_variables(model))
    expected = {k: _expected_shape(v.get_value()) for k, v in variables.items()}
    problems = _mismatches(expected, found)
    if problems:
        more = f" (and {len(problems) - 1} other mismatched keys)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"{os.fspath(path)}: checkpoint does not match the config: {problems[0]}{more}"
        )
    for key, var in variables.items():
        _assign(var, found[key])
