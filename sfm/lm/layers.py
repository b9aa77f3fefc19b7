"""LM building blocks: embeddings with a zero token, per-step linears, GQA attention, layers.

A "step" is a position along the sequence axis that has its own weights: the Moshi depth
transformer runs one step per codebook with separate weights per step. `steps` is a static
tuple naming, for each position of the input, which weight set it uses; None means a layer
with a single weight set.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sfm.kernels.grouped_matmul import grouped_matmul
from sfm.lm.layout import IGNORE, INITIAL
from sfm.nn.attention import Impl, cached_attention, init_cache, self_attention
from sfm.nn.init import logical, normal, uniform
from sfm.nn.mlp import GatedMlp
from sfm.nn.norm import RMSNorm
from sfm.nn.rope import apply_rope
from sfm.parallel.rules import constrain, per_batch_shard

Steps = tuple[int, ...] | None
State = dict[str, Any]
LayerCache = State | list[State]  # LayerStack: stacked rings, or one per layer
# Logical axes of a [B, T, D] activation (see sfm.parallel.rules.constrain).
ACTIVATION_AXES = ("batch", "time", "embed")
TIME_MAJOR_AXES = ("time", "batch", "embed")


class Embedding(nnx.Module):
    """Token table [vocab + 1, dim]: the extra row is the initial token; -1 embeds as zeros."""

    def __init__(self, vocab: int, dim: int, *, param_dtype: str = "float32", rngs: nnx.Rngs):
        self.vocab = vocab
        table = normal(rngs, (vocab + 1, dim), param_dtype) * dim**-0.5
        self.embedding = nnx.Param(table, **logical(("vocab", "embed")))

    def __call__(self, tokens: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        ids = jnp.where(tokens == INITIAL, self.vocab, jnp.maximum(tokens, 0))
        y = jnp.take(self.embedding[...], ids, axis=0).astype(dtype)
        return jnp.where((tokens == IGNORE)[..., None], jnp.zeros((), dtype), y)


class StepLinear(nnx.Module):
    """y = x @ W[s].T with one [out, in] kernel per weight set s (kernel [n_weights, out, in]).

    An optional low-rank adapter (see sfm.lm.lora) adds scaling * x @ A[s].T @ B[s].T, with
    `lora_a` [n_weights, rank, in] and `lora_b` [n_weights, out, rank]; None when absent.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        n_weights: int = 1,
        axes: tuple[str, str] = ("embed", "mlp"),
        param_dtype: str = "float32",
        impl: Impl = "xla",
        rngs: nnx.Rngs,
    ) -> None:
        self.n_weights, self.impl = n_weights, impl
        bound = in_features**-0.5
        kernel = uniform(rngs, (n_weights, out_features, in_features), bound, param_dtype)
        self.kernel = nnx.Param(kernel, **logical(("steps", axes[1], axes[0])))
        self.lora_a: nnx.Param | None = nnx.data(None)
        self.lora_b: nnx.Param | None = nnx.data(None)
        self.lora_scaling = 1.0

    def weights(self, dtype: Any) -> jax.Array:
        """The weight sets [n_weights, out, in] in `dtype`, with the adapter folded in (so a
        gradient through them reaches the kernel and the adapter alike)."""
        w = self.kernel[...].astype(dtype)
        if self.lora_a is None:
            return w
        assert self.lora_b is not None
        a, b = self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype)
        return w + (self.lora_scaling * jnp.einsum("...or,...ri->...oi", b, a)).astype(dtype)

    def __call__(
        self, x_bti: jax.Array, steps: Steps = None, *, time_major: bool = False
    ) -> jax.Array:
        """[..., T, in] -> [..., T, out]; position t uses weight set steps[t] (all: set 0).
        With `time_major` the positions are the leading axis instead: [T, ..., in]."""
        w = self.kernel[...].astype(x_bti.dtype)
        if self.n_weights == 1 or steps is None:
            y = jnp.einsum("...i,oi->...o", x_bti, w[0])
        else:
            sets = self._sets(w, steps, x_bti, time_major)
            y = _step_matmul(x_bti, sets, time_major, self.impl)
        return y if self.lora_a is None else y + self._lora(x_bti, steps, time_major)

    @staticmethod
    def _sets(w: jax.Array, steps: tuple[int, ...], x: jax.Array, time_major: bool) -> jax.Array:
        return _per_step(w, steps, x.shape[0] if time_major else x.shape[-2])

    def _lora(self, x_bti: jax.Array, steps: Steps, time_major: bool) -> jax.Array:
        """The adapter's term scaling * (x @ A[s].T) @ B[s].T, [..., T, out]."""
        assert self.lora_a is not None and self.lora_b is not None
        a = self.lora_a[...].astype(x_bti.dtype)
        b = self.lora_b[...].astype(x_bti.dtype)
        if self.n_weights == 1 or steps is None:
            h = jnp.einsum("...i,ri->...r", x_bti, a[0])
            y = jnp.einsum("...r,or->...o", h, b[0])
        else:
            h = _step_matmul(x_bti, self._sets(a, steps, x_bti, time_major), time_major, self.impl)
            y = _step_matmul(h, self._sets(b, steps, x_bti, time_major), time_major, self.impl)
        return (self.lora_scaling * y).astype(x_bti.dtype)


def _step_matmul(
    x_bti: jax.Array, w_toi: jax.Array, time_major: bool = False, impl: Impl = "xla"
) -> jax.Array:
    """y[..., t, :] = x[..., t, :] @ w[t].T: [..., T, in] x [T, out, in] -> [..., T, out]
    (with `time_major`: [T, ..., in] -> [T, ..., out]).

    With T > 1 the product runs step-major ([T, ..., in], T the dot's leading batch axis): the
    forward and backward dots XLA emits that way are faster than with T in second-to-last
    place. One position (a streaming step) keeps the plain form. impl "pallas" runs the
    step-major product as a grouped matmul kernel (sfm.kernels.grouped_matmul)."""
    if time_major:
        if impl == "xla":
            return jnp.einsum("t...i,toi->t...o", x_bti, w_toi)
        rows = x_bti.reshape(x_bti.shape[0], -1, x_bti.shape[-1])
        kernel = partial(grouped_matmul, impl=impl)
        y = per_batch_shard(kernel, (rows, w_toi), (1, None), 1)
        return y.reshape(*x_bti.shape[:-1], y.shape[-1])
    if x_bti.shape[-2] == 1:
        return jnp.einsum("...ti,toi->...to", x_bti, w_toi)
    return jnp.moveaxis(_step_matmul(jnp.moveaxis(x_bti, -2, 0), w_toi, True, impl), 0, -2)


def _per_step(w: jax.Array, steps: tuple[int, ...], t: int) -> jax.Array:
    """The weight sets [t, ...] that the t positions of a sequence use."""
    if len(steps) != t:
        raise ValueError(f"{len(steps)} weight steps for a sequence of {t}")
    if steps == tuple(range(steps[0], steps[0] + t)):
        return w[steps[0] : steps[0] + t]
    return w[jnp.asarray(steps)]


class Attention(nnx.Module):
    """Causal self-attention, fused [q | k | v] projection, optional RoPE and context window,
    grouped keys; per-step weights (see StepLinear). The attention is `sfm.nn.attention`'s."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kv_heads: int,
        *,
        context: int | None,
        max_period: float | None,
        n_weights: int = 1,
        param_dtype: str = "float32",
        impl: Impl = "xla",
        rngs: nnx.Rngs,
    ) -> None:
        self.num_heads, self.kv_heads, self.head_dim = num_heads, kv_heads, dim // num_heads
        self.context, self.max_period, self.impl = context, max_period, impl
        kw: dict[str, Any] = dict(
            n_weights=n_weights, param_dtype=param_dtype, impl=impl, rngs=rngs
        )
        qkv = (num_heads + 2 * kv_heads) * self.head_dim
        self.in_proj = StepLinear(dim, qkv, axes=("embed", "qkv"), **kw)
        self.out_proj = StepLinear(dim, dim, axes=("qkv", "embed"), **kw)

    def _qkv(
        self, x_btd: jax.Array, pos_bt: jax.Array, steps: Steps, time_major: bool = False
    ) -> tuple[jax.Array, ...]:
        h, g, d = self.num_heads, self.kv_heads, self.head_dim
        proj = self.in_proj(x_btd, steps, time_major=time_major)
        if time_major:
            proj = jnp.swapaxes(proj, 0, 1)
        b, t, _ = proj.shape
        q = proj[..., : h * d].reshape(b, t, h, d)
        k = proj[..., h * d : (h + g) * d].reshape(b, t, g, d)
        v = proj[..., (h + g) * d :].reshape(b, t, g, d)
        if self.max_period is not None:
            q, k = apply_rope(q, k, pos_bt, self.max_period)
        return q, k, v

    def __call__(
        self, x_btd: jax.Array, pos_bt: jax.Array, steps: Steps = None, time_major: bool = False
    ) -> jax.Array:
        """x [B, T, D] (with `time_major` [T, B, D]: the projections run step-major, the
        attention itself batch-major) and positions [B, T] -> the same layout as x."""
        q, k, v = self._qkv(x_btd, pos_bt, steps, time_major)
        out = self_attention(q, k, v, pos_bt, context=self.context, impl=self.impl)
        if time_major:
            out = jnp.swapaxes(out, 0, 1)
        return self.out_proj(out, steps, time_major=time_major)

    def init_state(self, batch: int, capacity: int, dtype: Any) -> State:
        """A ring of `capacity` keys and values (see `sfm.nn.attention.init_cache`)."""
        return init_cache(batch, capacity, self.kv_heads, self.head_dim, dtype)

    def step(
        self, state: State, x_btd: jax.Array, pos_bt: jax.Array, steps: Steps = None
    ) -> tuple[State, jax.Array]:
        """Attend over the ring and the new keys; the ring gains the new keys."""
        q, k, v = self._qkv(x_btd, pos_bt, steps)
        state, out = cached_attention(state, q, k, v, pos_bt, context=self.context, impl=self.impl)
        return state, self.out_proj(out, steps)


class Layer(nnx.Module):
    """Pre-norm block: x + attn(rms(x)), then x + gated_mlp(rms(x)) (no layer scale)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kv_heads: int,
        hidden: int,
        *,
        context: int | None,
        max_period: float | None,
        norm_eps: float,
        n_weights: int = 1,
        param_dtype: str = "float32",
        impl: Impl = "xla",
        rngs: nnx.Rngs,
    ) -> None:
        kw: dict[str, Any] = dict(
            n_weights=n_weights, param_dtype=param_dtype, impl=impl, rngs=rngs
        )
        self.norm1 = RMSNorm(dim, eps=norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(
            dim, num_heads, kv_heads, context=context, max_period=max_period, **kw
        )
        self.norm2 = RMSNorm(dim, eps=norm_eps, param_dtype=param_dtype)
        self.gating = GatedMlp(
            StepLinear(dim, 2 * hidden, axes=("embed", "mlp"), **kw),
            StepLinear(hidden, dim, axes=("mlp", "embed"), **kw),
        )

    def __call__(
        self, x_btd: jax.Array, pos_bt: jax.Array, steps: Steps = None, time_major: bool = False
    ) -> jax.Array:
        """x [B, T, D], or [T, B, D] with `time_major` (see Attention); positions [B, T]."""
        axes = TIME_MAJOR_AXES if time_major else ACTIVATION_AXES
        x_btd = constrain(x_btd, axes)  # the scanned carry: batch-sharded on a mesh
        x_btd = x_btd + self.self_attn(self.norm1(x_btd), pos_bt, steps, time_major)
        x_btd = x_btd + self.gating(self.norm2(x_btd), steps, time_major=time_major)
        return constrain(x_btd, axes)

    def step(
        self, state: State, x_btd: jax.Array, pos_bt: jax.Array, steps: Steps = None
    ) -> tuple[State, jax.Array]:
        state, h = self.self_attn.step(state, self.norm1(x_btd), pos_bt, steps)
        x_btd = x_btd + h
        return state, x_btd + self.gating(self.norm2(x_btd), steps)


REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer: recompute everything on the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class LayerStack(nnx.Module):
    """`num_layers` identical layers.

    With `scan_layers` (the default) their parameters are stacked on a leading "layers" axis
    and a scan runs them: one layer to compile, whatever the depth. `scan_unroll` is the
    `unroll` of that scan in `__call__` (the teacher-forced pass): layers per loop iteration,
    True for all, False for 1. `step` always runs a rolled loop: unrolled, the per-layer cache
    slices and their write-back into the stacked cache cost more.

    Without `scan_layers` every layer holds its own parameters (`layers[i]`) and a Python loop
    runs them: no per-layer slices of stacked weights on the forward pass and no stacking of
    per-layer gradients on the backward pass (on CPU a few percent of a small model's step),
    at the price of compiling every layer. The two layouts have different parameter paths."""

    def __init__(
        self,
        num_layers: int,
        *,
        remat: str = "none",
        scan_unroll: bool | int = False,
        scan_layers: bool = True,
        rngs: nnx.Rngs,
        **layer_kw: Any,
    ) -> None:
        self.num_layers, self.remat, self.scan_unroll = num_layers, remat, scan_unroll
        self.scan_layers = scan_layers
        if not scan_layers:
            self.layers = nnx.List([Layer(rngs=rngs, **layer_kw) for _ in range(num_layers)])
            return

        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(
            in_axes=(0,),
            out_axes=0,
            axis_size=num_layers,
            transform_metadata={nnx.PARTITION_NAME: "layers"},
        )
        def make(rngs: nnx.Rngs) -> Layer:
            return Layer(rngs=rngs, **layer_kw)

        self.layers = make(rngs)

    def __call__(
        self, x_btd: jax.Array, pos_bt: jax.Array, steps: Steps = None, time_major: bool = False
    ) -> jax.Array:
        """x [B, T, D] (or [T, B, D], see Layer) through the layers."""

        def body(layer: Layer, x: jax.Array) -> jax.Array:
            return layer(x, pos_bt, steps, time_major)

        if self.remat != "none":
            body = nnx.remat(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        if not self.scan_layers:
            for layer in self.layers:
                x_btd = body(layer, x_btd)
            return x_btd
        scan = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry, unroll=self.scan_unroll)
        return scan(self.layers, x_btd)

    @property
    def cache_batch_axis(self) -> int:
        """The batch axis of every array of `init_state`'s cache."""
        return 1 if self.scan_layers else 0

    def cache_capacity(self, state: LayerCache) -> int:
        """The ring size of a cache made by `init_state`."""
        return (state if self.scan_layers else state[0])["pos"].shape[-1]

    def init_state(self, batch: int, capacity: int, dtype: Any) -> LayerCache:
        """Per-layer KV rings: stacked on a leading layer axis with `scan_layers`, else a
        list with one ring per layer."""
        if not self.scan_layers:
            return [layer.self_attn.init_state(batch, capacity, dtype) for layer in self.layers]
        one = self.layers.self_attn.init_state(batch, capacity, dtype)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_layers, *a.shape)), one)

    def step(
        self, state: LayerCache, x_btd: jax.Array, pos_bt: jax.Array, steps: Steps = None
    ) -> tuple[LayerCache, jax.Array]:
        if not self.scan_layers:
            caches = []
            for layer, cache in zip(self.layers, state, strict=True):
                cache, x_btd = layer.step(cache, x_btd, pos_bt, steps)
                caches.append(cache)
            return caches, x_btd

        def body(layer: Layer, x: jax.Array, cache: State) -> tuple[jax.Array, State]:
            cache, x = layer.step(cache, x, pos_bt, steps)
            return x, cache

        scan = nnx.scan(body, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        x_btd, state = scan(self.layers, x_btd, state)
        return state, x_btd
