"""The train step: one jit with explicit in/out shardings and donated parameters.

The model is split into trainable parameters (all `nnx.Param`, or only the LoRA adapters),
frozen state and the optimizer state; the step is a pure function of them, so shardings are
declared once from the logical axis rules and the compiled step is reused every iteration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sfm.parallel.rules import Rules, batch_sharding, param_shardings
from sfm.train.config import OptimConfig, TrainConfig

Batch = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def make_optimizer(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on a warm-up + cosine/constant schedule."""
    warmup = min(cfg.warmup_steps, max(steps - 1, 1))
    if cfg.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, warmup, max(steps, warmup + 1), cfg.lr * cfg.min_lr_ratio
        )
    else:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)], [warmup]
        )
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )


@dataclass
class TrainParts:
    """A model split for training, the optimizer and the shardings of every piece."""

    graphdef: nnx.GraphDef
    params: nnx.State
    frozen: nnx.State
    opt_state: Any
    tx: optax.GradientTransformation
    shardings: dict[str, Any]


def train_shardings(
    params: nnx.State, frozen: nnx.State, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules
) -> dict[str, Any]:
    """NamedShardings of params, frozen state and optimizer state (concrete or abstract):
    optimizer moments follow their parameter, scalars (step counts) are replicated."""
    p_sh = param_shardings(params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    o_sh = optax.tree_map_params(
        tx,
        lambda _, s: s,
        jax.eval_shape(tx.init, params),
        p_sh,
        transform_non_params=lambda _: replicated,
    )
    return {
        "params": p_sh,
        "frozen": param_shardings(frozen, mesh, rules),
        "opt_state": o_sh,
        "replicated": replicated,
    }


def split_model(
    model: nnx.Module, trainable: Any, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules
) -> TrainParts:
    """Split off the trainable params, shard everything by the rules, init the optimizer."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    sh = train_shardings(params, frozen, tx, mesh, rules)
    params, frozen = jax.device_put(params, sh["params"]), jax.device_put(frozen, sh["frozen"])
    opt_state = jax.jit(tx.init, out_shardings=sh["opt_state"])(params)
    return TrainParts(graphdef, params, frozen, opt_state, tx, sh)


def _microbatches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B / n, ...] for gradient accumulation."""
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def build_train_step(
    parts: TrainParts, loss_fn: LossFn, cfg: TrainConfig
) -> Callable[..., tuple[nnx.State, Any, dict[str, jax.Array]]]:
    """jit(step)(params, frozen, opt_state, batch, rng) -> (params, opt_state, metrics)."""
    graphdef, tx, accum = parts.graphdef, parts.tx, cfg.grad_accum

    def loss_of(params: nnx.State, frozen: nnx.State, batch: Batch, rng: jax.Array) -> Any:
        return loss_fn(nnx.merge(graphdef, params, frozen), batch, rng)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def grads_of(params: nnx.State, frozen: nnx.State, batch: Batch, rng: jax.Array) -> Any:
        if accum == 1:
            return grad_fn(params, frozen, batch, rng)

        def body(carry: Any, xs: tuple[Batch, jax.Array]) -> tuple[Any, None]:
            (loss, metrics), grads = grad_fn(params, frozen, *xs)
            acc = jax.tree.map(jnp.add, carry, ((loss, metrics), grads))
            return acc, None

        rngs = jax.random.split(rng, accum)
        micro = _microbatches(batch, accum)
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(grad_fn, params, frozen, first, rngs[0])
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = jax.lax.scan(body, zero, (micro, rngs))
        return jax.tree.map(lambda x: x / accum, total)

    def step(
        params: nnx.State, frozen: nnx.State, opt_state: Any, batch: Batch, rng: jax.Array
    ) -> Any:
        (loss, metrics), grads = grads_of(params, frozen, batch, rng)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if cfg.nan_policy == "skip":
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            new_params = jax.tree.map(keep, new_params, params)
            new_opt = jax.tree.map(keep, new_opt, opt_state)
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "finite": finite}
        return new_params, new_opt, metrics

    sh, rep = parts.shardings, parts.shardings["replicated"]
    return jax.jit(
        step,
        in_shardings=(sh["params"], sh["frozen"], sh["opt_state"], None, rep),
        out_shardings=(sh["params"], sh["opt_state"], rep),
        donate_argnums=(0, 2),
    )


def shard_batch(batch: dict[str, Any], mesh: Mesh, rules: Rules) -> Batch:
    """Host numpy batch -> global arrays sharded on the batch axis (multi-host aware)."""

    def put(x: Any) -> jax.Array:
        sharding = batch_sharding(mesh, rules, x.ndim)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)
