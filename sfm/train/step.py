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

from sfm.parallel.rules import Rules, activation_sharding, batch_sharding, param_shardings
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
    mutable: nnx.State  # non-trained state the loss updates (EMA codebooks); often empty
    frozen: nnx.State
    opt_state: Any
    tx: optax.GradientTransformation
    shardings: dict[str, Any]
    mutable_filter: Any = nnx.Nothing
    rules: Rules | None = None  # logical axis rules; given, activations are sharded by them


def train_shardings(
    params: nnx.State,
    mutable: nnx.State,
    frozen: nnx.State,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules,
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
        "mutable": param_shardings(mutable, mesh, rules),
        "frozen": param_shardings(frozen, mesh, rules),
        "opt_state": o_sh,
        "replicated": replicated,
    }


def split_model(
    model: nnx.Module,
    trainable: Any,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules,
    mutable: Any = nnx.Nothing,
) -> TrainParts:
    """Split off the trainable params and the state the loss updates, shard everything by
    the rules, init the optimizer."""
    graphdef, params, mut, frozen = nnx.split(model, trainable, mutable, ...)
    sh = train_shardings(params, mut, frozen, tx, mesh, rules)
    params, mut, frozen = (
        jax.device_put(x, sh[k])
        for x, k in ((params, "params"), (mut, "mutable"), (frozen, "frozen"))
    )
    opt_state = jax.jit(tx.init, out_shardings=sh["opt_state"])(params)
    return TrainParts(graphdef, params, mut, frozen, opt_state, tx, sh, mutable, rules)


def _microbatches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B / n, ...] for gradient accumulation."""
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def build_train_step(
    parts: TrainParts, loss_fn: LossFn, cfg: TrainConfig
) -> Callable[..., tuple[nnx.State, nnx.State, Any, dict[str, jax.Array]]]:
    """jit(step)(params, mutable, frozen, opt_state, batch, rng)
    -> (params, mutable, opt_state, metrics); params, mutable and opt_state are donated."""
    graphdef, tx, accum, mut_filter = parts.graphdef, parts.tx, cfg.grad_accum, parts.mutable_filter
    mesh, rules = parts.shardings["replicated"].mesh, parts.rules

    def loss_of(
        params: nnx.State, mutable: nnx.State, frozen: nnx.State, batch: Batch, rng: jax.Array
    ) -> Any:
        # Rebuild the non-differentiated states so their Variables belong to this trace level
        # (nnx transforms inside the model refuse Variables made at the outer jit level).
        mutable, frozen = jax.tree.map(lambda x: x, (mutable, frozen))
        model = nnx.merge(graphdef, params, mutable, frozen)
        if rules is None:
            loss, metrics = loss_fn(model, batch, rng)
        else:  # the model's `constrain` calls shard activations (the batch axis) on the mesh
            with activation_sharding(mesh, rules):
                loss, metrics = loss_fn(model, batch, rng)
        return loss, (metrics, nnx.state(model, mut_filter))

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def grads_of(
        params: nnx.State, mutable: nnx.State, frozen: nnx.State, batch: Batch, rng: jax.Array
    ) -> Any:
        if accum == 1:
            return grad_fn(params, mutable, frozen, batch, rng)

        def body(carry: Any, xs: tuple[Batch, jax.Array]) -> tuple[Any, None]:
            (loss_sum, metrics_sum, mut), grads_sum = carry
            (loss, (metrics, mut)), grads = grad_fn(params, mut, frozen, *xs)
            add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731
            return ((loss_sum + loss, add(metrics_sum, metrics), mut), add(grads_sum, grads)), None

        rngs = jax.random.split(rng, accum)
        micro = _microbatches(batch, accum)
        first = jax.tree.map(lambda x: x[0], micro)
        (_, (m_shape, _)), g_shape = jax.eval_shape(
            grad_fn, params, mutable, frozen, first, rngs[0]
        )
        zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)  # noqa: E731
        init = ((jnp.zeros((), jnp.float32), zeros(m_shape), mutable), zeros(g_shape))
        ((loss, metrics, mutable), grads), _ = jax.lax.scan(body, init, (micro, rngs))
        mean = lambda t: jax.tree.map(lambda x: x / accum, t)  # noqa: E731
        return (loss / accum, (mean(metrics), mutable)), mean(grads)

    def step(
        params: nnx.State,
        mutable: nnx.State,
        frozen: nnx.State,
        opt_state: Any,
        batch: Batch,
        rng: jax.Array,
    ) -> Any:
        (loss, (metrics, new_mutable)), grads = grads_of(params, mutable, frozen, batch, rng)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if cfg.nan_policy == "skip":
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            new_params = jax.tree.map(keep, new_params, params)
            new_mutable = jax.tree.map(keep, new_mutable, mutable)
            new_opt = jax.tree.map(keep, new_opt, opt_state)
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "finite": finite}
        return new_params, new_mutable, new_opt, metrics

    sh, rep = parts.shardings, parts.shardings["replicated"]
    return jax.jit(
        step,
        in_shardings=(sh["params"], sh["mutable"], sh["frozen"], sh["opt_state"], None, rep),
        out_shardings=(sh["params"], sh["mutable"], sh["opt_state"], rep),
        donate_argnums=(0, 1, 3),
    )


def shard_batch(batch: dict[str, Any], mesh: Mesh, rules: Rules) -> Batch:
    """Host numpy batch -> global arrays sharded on the batch axis (multi-host aware)."""

    def put(x: Any) -> jax.Array:
        sharding = batch_sharding(mesh, rules, x.ndim)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)
