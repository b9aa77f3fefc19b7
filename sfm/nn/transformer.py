"""Pre-norm causal transformer (Mimi flavour: LayerNorm, GELU MLP, layer scale, RoPE)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sfm.nn.attention import Impl, MultiHeadAttention
from sfm.nn.linear import LayerScale
from sfm.nn.mlp import Mlp, gated_mlp
from sfm.nn.norm import LayerNorm, RMSNorm

State = dict[str, Any]


class TransformerLayer(nnx.Module):
    """x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dim_feedforward: int,
        *,
        context: int | None,
        max_period: float | None,
        layer_scale: float | None,
        norm: str = "layer_norm",
        norm_eps: float = 1e-5,
        gating: bool = False,
        param_dtype: str = "float32",
        attention_impl: Impl = "xla",
        rngs: nnx.Rngs,
    ) -> None:
        norm_cls = LayerNorm if norm == "layer_norm" else RMSNorm
        self.norm1 = norm_cls(dim, eps=norm_eps, param_dtype=param_dtype)
        self.self_attn = MultiHeadAttention(
            dim,
            num_heads,
            context=context,
            max_period=max_period,
            param_dtype=param_dtype,
            impl=attention_impl,
            rngs=rngs,
        )
        self.norm2 = norm_cls(dim, eps=norm_eps, param_dtype=param_dtype)
        mlp_cls = gated_mlp if gating else Mlp
        self.mlp = mlp_cls(dim, dim_feedforward, param_dtype=param_dtype, rngs=rngs)
        self.layer_scale_1 = LayerScale(dim, layer_scale) if layer_scale is not None else None
        self.layer_scale_2 = LayerScale(dim, layer_scale) if layer_scale is not None else None

    def _scaled(self, ls: LayerScale | None, x: jax.Array) -> jax.Array:
        return x if ls is None else ls(x)

    def _ff(self, x: jax.Array) -> jax.Array:
        return x + self._scaled(self.layer_scale_2, self.mlp(self.norm2(x)))

    def __call__(self, x: jax.Array, pos_bt: jax.Array) -> jax.Array:
        x = x + self._scaled(self.layer_scale_1, self.self_attn(self.norm1(x), pos_bt))
        return self._ff(x)

    def step(self, state: State, x: jax.Array, pos_bt: jax.Array) -> tuple[State, jax.Array]:
        state, h = self.self_attn.step(state, self.norm1(x), pos_bt)
        x = x + self._scaled(self.layer_scale_1, h)
        return state, self._ff(x)


class Transformer(nnx.Module):
    """A stack of layers; positions come from a per-item offset so sessions reset independently."""

    def __init__(
        self, num_layers: int, dim: int, *, context: int | None, rngs: nnx.Rngs, **kw: Any
    ):
        self.dim, self.context = dim, context
        self.layers = nnx.List(
            [TransformerLayer(dim, context=context, rngs=rngs, **kw) for _ in range(num_layers)]
        )

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        b, t, _ = x_btd.shape
        pos_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        for layer in self.layers:
            x_btd = layer(x_btd, pos_bt)
        return x_btd

    def init_state(
        self, batch: int, capacity: int | None = None, dtype: Any = jnp.float32
    ) -> State:
        """KV caches of `capacity` steps (default: the attention context)."""
        cap = capacity or self.context
        if cap is None:
            raise ValueError("capacity: required when the transformer has no context window")
        return {
            "offset": jnp.zeros((batch,), jnp.int32),
            "layers": [layer.self_attn.init_state(batch, cap, dtype) for layer in self.layers],
        }

    def step(self, state: State, x_btd: jax.Array) -> tuple[State, jax.Array]:
        t = x_btd.shape[1]
        pos_bt = state["offset"][:, None] + jnp.arange(t, dtype=jnp.int32)
        caches = []
        for layer, cache in zip(self.layers, state["layers"], strict=True):
            cache, x_btd = layer.step(cache, x_btd, pos_bt)
            caches.append(cache)
        return {"offset": state["offset"] + t, "layers": caches}, x_btd
