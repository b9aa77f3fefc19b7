"""Low-rank adapters (LoRA) on the LM's linears.

`apply_lora` gives each matching `StepLinear` a pair A [..., n_weights, rank, in] (random)
and B [..., n_weights, out, rank] (zeros, so the model is unchanged at first), held as
`LoRAParam` so an optimizer can train only them::

    optimizer = nnx.Optimizer(model, optax.adam(1e-4), wrt=LoRAParam)

`merge_lora` folds scaling * B @ A into the kernels and removes the adapters. Stacked layers
(a leading "layers" axis on every parameter) get adapters with the same leading axes.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax.numpy as jnp
from flax import nnx

from sfm.lm.layers import StepLinear
from sfm.nn.init import logical, uniform

DEFAULT_TARGETS: tuple[str, ...] = ("in_proj", "out_proj", "linear_in", "linear_out")
# Linears whose kernel the model reads directly instead of calling them: an adapter there
# would be ignored by the forward pass yet changed by merge_lora.
KERNEL_READ_DIRECTLY: tuple[str, ...] = ("depformer_in",)


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix: a trainable parameter kept apart from the base weights."""


def _matches(path: tuple[str, ...], target: str) -> bool:
    """`target` ("in_proj", "depth.transformer") names consecutive components of `path`."""
    parts = tuple(target.split("."))
    n = len(parts)
    return any(path[i : i + n] == parts for i in range(len(path) - n + 1))


def lora_linears(
    model: nnx.Module, targets: tuple[str, ...] = DEFAULT_TARGETS
) -> Iterator[tuple[str, StepLinear]]:
    """(dotted path, module) of every StepLinear whose path matches one of `targets`."""
    for path, node in nnx.iter_graph(model):
        names = tuple(str(p) for p in path)
        if isinstance(node, StepLinear) and any(_matches(names, t) for t in targets):
            yield ".".join(names), node


def _add_adapter(linear: StepLinear, rank: int, scaling: float, rngs: nnx.Rngs) -> None:
    """Creates A (uniform, bound 1/sqrt(in)) and B (zeros) with the kernel's leading axes.

    Both are sharded like the kernel: the rank dim takes the logical axis of the kernel dim
    it replaces (A [rank, in] as [out, in], B [out, rank] as [out, in]), so an adapter whose
    feature dim is replicated (the fused qkv) still splits over the mesh by its rank."""
    kernel = linear.kernel
    *lead, out_features, in_features = kernel.shape
    axes = tuple(kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim)
    dtype = str(kernel.dtype)
    a = uniform(rngs, (*lead, rank, in_features), in_features**-0.5, dtype)
    b = jnp.zeros((*lead, out_features, rank), dtype)
    linear.lora_a = LoRAParam(a, **logical(axes))
    linear.lora_b = LoRAParam(b, **logical(axes))
    linear.lora_scaling = float(scaling)


def apply_lora(
    model: nnx.Module,
    rank: int,
    scaling: float,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    *,
    rngs: nnx.Rngs | None = None,
) -> list[str]:
    """Adds adapters of `rank` to the matching StepLinears in place; returns their paths.

    The adapter adds scaling * x @ A.T @ B.T (the usual choice is scaling = alpha / rank).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    found = list(lora_linears(model, targets))
    if not found:
        raise ValueError(f"no linear matches the LoRA targets {list(targets)}")
    for path, linear in found:
        if path.split(".")[-1] in KERNEL_READ_DIRECTLY:
            raise ValueError(f"{path}: the model reads this kernel directly; LoRA unsupported")
        if linear.lora_a is not None:
            raise ValueError(f"{path}: already has a LoRA adapter")
        _add_adapter(linear, rank, scaling, rngs)
    return [path for path, _ in found]


def merge_lora(model: nnx.Module) -> int:
    """Folds every adapter into its kernel (W += scaling * B @ A) and removes it.

    Returns the number of linears merged."""
    merged = 0
    for _, linear in list(nnx.iter_graph(model)):
        if not isinstance(linear, StepLinear) or linear.lora_a is None:
            continue
        linear.kernel[...] = linear.weights(jnp.float32).astype(linear.kernel.dtype)
        linear.lora_a = linear.lora_b = None
        linear.lora_scaling = 1.0
        merged += 1
    return merged


__all__ = ["DEFAULT_TARGETS", "LoRAParam", "apply_lora", "lora_linears", "merge_lora"]
