"""Map logical axis names to mesh axes: PartitionSpecs, parameter shardings and constraints.

The rules are data (`MeshConfig.rules`): `(logical_name, mesh_axes | None)` pairs. A logical
name may appear more than once; the first entry whose mesh axes are all still free in the
spec wins (as in MaxText). A mesh axis is used at most once per spec: later uses are dropped.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from sfm.errors import ConfigError

Rules = Sequence[tuple[str, Sequence[str] | str | None]]
LogicalAxes = PartitionSpec | Sequence[str | Sequence[str] | None]
ModuleT = TypeVar("ModuleT", bound=nnx.Module)

logger = logging.getLogger(__name__)

# The rules `constrain` resolves activation axes with; set by `activation_sharding`.
_ACTIVATION_RULES: contextvars.ContextVar[tuple[Any, ...] | None] = contextvars.ContextVar(
    "sfm_activation_rules", default=None
)


def logical_to_mesh_spec(logical: LogicalAxes, rules: Rules) -> PartitionSpec:
    """Translate a spec of logical names (or None) into a spec of mesh axes via rules."""
    table = _rule_table(rules)
    used: set[str] = set()
    entries: list[str | tuple[str, ...] | None] = []
    for entry in logical:
        axes: list[str] = []
        for name in _names(entry):
            picked = _pick_axes(name, table, used)
            used.update(picked)
            axes.extend(picked)
        entries.append(_spec_entry(axes))
    return PartitionSpec(*entries)


def param_shardings(
    model_or_state: nnx.Module | nnx.State,
    mesh: Mesh,
    rules: Rules,
    fallbacks: list[str] | None = None,
) -> nnx.State:
    """Return a State of NamedShardings mirroring nnx.state(model); unannotated -> replicated.

    A dim whose size the mesh axes do not divide is replicated instead; one line per such
    dim is logged and appended to `fallbacks` when given.
    """
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    logical = nnx.get_partition_spec(state)
    dropped: list[str] = []

    def one(path: tuple[Any, ...], leaf: object, spec: PartitionSpec) -> NamedSharding:
        name = _path_name(path)
        mesh_spec = _checked_spec(logical_to_mesh_spec(spec, rules), mesh, name)
        return NamedSharding(mesh, _fit_to_shape(mesh_spec, _shape(leaf), mesh, name, dropped))

    shardings = jax.tree_util.tree_map_with_path(one, state, logical)
    if dropped:
        logger.warning(
            "replicated %d parameter dims not divisible by their mesh axes: %s",
            len(dropped),
            "; ".join(dropped),
        )
    if fallbacks is not None:
        fallbacks.extend(dropped)
    return shardings


def shard_model(model: ModuleT, mesh: Mesh, rules: Rules) -> ModuleT:
    """Return a new model whose state is device_put onto param_shardings (input untouched)."""
    graphdef, state = nnx.split(model)
    shardings = param_shardings(state, mesh, rules)
    return nnx.merge(graphdef, jax.device_put(state, shardings))


def activation_constraint(
    x: jax.Array, logical_axes: LogicalAxes, mesh: Mesh | None, rules: Rules
) -> jax.Array:
    """Constrain activation x to the sharding of its logical axes; a no-op when mesh is None."""
    if mesh is None:
        return x
    spec = _checked_spec(logical_to_mesh_spec(logical_axes, rules), mesh, "activation")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | AbstractMesh, rules: Rules) -> Iterator[None]:
    """Within this context `constrain` shards activations over mesh by rules.

    Usable inside jit (it sets JAX's abstract mesh, not a device context): the train step
    enters it around the loss so that model code need not know the mesh or the rules."""
    token = _ACTIVATION_RULES.set(tuple(rules))
    try:
        with jax.sharding.use_abstract_mesh(getattr(mesh, "abstract_mesh", mesh)):
            yield
    finally:
        _ACTIVATION_RULES.reset(token)


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """Constrain activation x to its logical axes under `activation_sharding`.

    A no-op outside that context or on a single device; a dim its mesh axes do not divide
    stays replicated."""
    rules = _ACTIVATION_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty or mesh.size == 1:
        return x
    spec = _checked_spec(logical_to_mesh_spec(logical_axes, rules), mesh, "activation")
    spec = _fit_to_shape(spec, tuple(x.shape), mesh, "activation", [])
    return jax.lax.with_sharding_constraint(x, spec)


def per_batch_shard(
    fn: Callable[..., jax.Array],
    args: Sequence[jax.Array],
    batch_dims: Sequence[int | None],
    out_batch_dim: int,
) -> jax.Array:
    """`fn(*args)` run per shard of the "batch" logical axis under `activation_sharding`
    (a shard_map: a kernel custom call XLA cannot partition itself sees its local rows);
    `batch_dims[i]` is the batch dim of args[i] (None: replicated, e.g. weights, whose
    gradients are summed over the shards). Every other dim is gathered: under tensor
    parallelism each tensor rank computes the whole product. Plain `fn(*args)` outside that
    context or on one device; also, with a warning, when the batch does not divide."""
    rules = _ACTIVATION_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty or mesh.size == 1:
        return fn(*args)
    entry = _checked_spec(logical_to_mesh_spec(("batch",), rules), mesh, "activation")[0]
    ways = math.prod(mesh.shape[axis] for axis in _names(entry))
    sizes = {a.shape[d] for a, d in zip(args, batch_dims, strict=True) if d is not None}
    if entry is None:
        return fn(*args)
    if any(size % ways for size in sizes):
        logger.warning(
            "kernel %s: batch %s does not divide over %s (%d ways); it runs unsharded",
            getattr(fn, "__name__", fn), sorted(sizes), entry, ways,
        )  # fmt: skip
        return fn(*args)

    def spec(ndim: int, dim: int | None) -> PartitionSpec:
        entries: list[Any] = [None] * ndim
        if dim is not None:
            entries[dim] = entry
        return PartitionSpec(*entries)

    out_ndim = jax.eval_shape(fn, *args).ndim
    in_specs = tuple(spec(a.ndim, d) for a, d in zip(args, batch_dims, strict=True))
    mapped = jax.shard_map(
        fn, mesh=mesh, in_specs=in_specs, out_specs=spec(out_ndim, out_batch_dim),
        check_vma=False,
    )  # fmt: skip
    return mapped(*args)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
    """Sharding for a rank-ndim input whose leading dim is the "batch" logical axis."""
    return NamedSharding(mesh, logical_to_mesh_spec(("batch",) + (None,) * (ndim - 1), rules))


def check_global_batch(batch: int, mesh: Mesh, rules: Rules) -> None:
    """ConfigError naming data.batch_size unless the global batch divides by the mesh's hosts
    (each reads batch / hosts rows) and by the batch sharding's ways (`sfm train` and
    `sfm compile` both check it before building a step)."""
    hosts = len({d.process_index for d in mesh.devices.flat})
    spec = batch_sharding(mesh, rules, 1).spec[0]
    axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
    ways = math.prod(mesh.shape[a] for a in axes)
    if batch % hosts or batch % ways:
        raise ConfigError(
            f"data.batch_size: the global batch {batch} must divide by the {hosts} "
            f"host{'s' * (hosts != 1)} and by the {ways}-way batch sharding over {axes}"
        )


def _rule_table(rules: Rules) -> dict[str, list[tuple[str, ...]]]:
    table: dict[str, list[tuple[str, ...]]] = {}
    for name, axes in rules:
        table.setdefault(name, []).append(_names(axes))
    return table


def _names(entry: str | Sequence[str] | None) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def _pick_axes(
    name: str, table: dict[str, list[tuple[str, ...]]], used: set[str]
) -> tuple[str, ...]:
    """First rule for name whose axes are all free, else the first rule minus used axes."""
    candidates = table.get(name)
    if candidates is None:
        raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
    for axes in candidates:
        if not used.intersection(axes):
            return axes
    return tuple(axis for axis in candidates[0] if axis not in used)


def _spec_entry(axes: Sequence[str]) -> str | tuple[str, ...] | None:
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def _checked_spec(spec: PartitionSpec, mesh: Mesh, name: str) -> PartitionSpec:
    """Raise a ValueError naming the value when the spec uses an axis the mesh lacks."""
    for entry in spec:
        for axis in _names(entry):
            if axis not in mesh.axis_names:
                raise ValueError(
                    f"{name}: sharding rule maps to mesh axis {axis!r}, "
                    f"mesh has {tuple(mesh.axis_names)}"
                )
    return spec


def _fit_to_shape(
    spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, name: str, dropped: list[str]
) -> PartitionSpec:
    """Replicate every dim whose size the product of its mesh axes does not divide."""
    if len(spec) > len(shape):
        raise ValueError(f"{name}: {len(spec)} logical axes for a value of shape {shape}")
    entries = list(spec)
    for dim, entry in enumerate(entries):
        axes = _names(entry)
        ways = math.prod(mesh.shape[axis] for axis in axes)
        if shape[dim] % ways:
            dropped.append(f"{name} dim {dim} (size {shape[dim]}) over {axes} ({ways} ways)")
            entries[dim] = None
    return PartitionSpec(*entries)


def _shape(leaf: object) -> tuple[int, ...]:
    """Shape of an array, ShapeDtypeStruct or Python scalar."""
    shape = getattr(leaf, "shape", None)
    return tuple(shape) if shape is not None else np.shape(leaf)


def _path_name(path: tuple[Any, ...]) -> str:
    """Readable dotted name of a state path, e.g. 'layers.0.kernel'."""
    parts = [getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))) for key in path]
    return ".".join(str(part) for part in parts if part != "value")
