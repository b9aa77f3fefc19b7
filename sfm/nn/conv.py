"""Causal 1-d convolutions that stream: the offline call is one step from a fresh state.

Layout is [batch, time, channels] throughout. A causal conv keeps the last
(effective kernel - stride) input samples as state; a transposed conv keeps the
(kernel - stride) output samples still waiting for the next input's overlap-add.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sfm.nn import init

State = dict[str, Any]


def _conv_params(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    axes: tuple[str, ...],
    fan_in: int,
    use_bias: bool,
    dtype: str,
) -> tuple[nnx.Param, nnx.Param | None]:
    """Kernel and optional bias [out], both U(+-1/sqrt(fan_in)) as PyTorch initialises them."""
    bound = 1.0 / math.sqrt(fan_in)
    kernel = nnx.Param(init.uniform(rngs, shape, bound, dtype), **init.logical(axes))
    if not use_bias:
        return kernel, None
    out = shape[axes.index("conv_out")]
    bias = init.uniform(rngs, (out,), bound, dtype)
    return kernel, nnx.Param(bias, **init.logical(("conv_out",)))


class StreamingConv1d(nnx.Module):
    """Causal conv1d; input length per step must be a multiple of the stride.

    `pad_mode` "constant" pads the start with zeros, "replicate" with the first sample.
    Kernel layout is [kernel, in/groups, out].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        use_bias: bool = True,
        pad_mode: str = "constant",
        param_dtype: str = "float32",
        rngs: nnx.Rngs,
    ) -> None:
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"pad_mode: expected constant or replicate, got {pad_mode!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.dilation, self.groups = stride, dilation, groups
        self.pad_mode = pad_mode
        shape = (kernel_size, in_channels // groups, out_channels)
        axes = ("conv_kernel", "conv_in", "conv_out")
        fan_in = in_channels // groups * kernel_size
        self.kernel, self.bias = _conv_params(rngs, shape, axes, fan_in, use_bias, param_dtype)

    @property
    def context(self) -> int:
        """Input samples carried from one step to the next."""
        effective = (self.kernel.shape[0] - 1) * self.dilation + 1
        return effective - self.stride

    def init_state(self, batch: int, dtype: Any = jnp.float32) -> State:
        return {
            "previous": jnp.zeros((batch, self.context, self.in_channels), dtype),
            "first": jnp.ones((batch,), jnp.bool_),
        }

    def step(self, state: State, x_btc: jax.Array) -> tuple[State, jax.Array]:
        tp = self.context
        previous = state["previous"].astype(x_btc.dtype)
        if tp and self.pad_mode == "replicate":
            first_sample = jnp.broadcast_to(x_btc[:, :1], previous.shape)
            previous = jnp.where(state["first"][:, None, None], first_sample, previous)
        x = jnp.concatenate([previous, x_btc], axis=1) if tp else x_btc
        y = self._conv(x)
        new_previous = x[:, x.shape[1] - tp :] if tp else state["previous"]
        return {"previous": new_previous, "first": jnp.zeros_like(state["first"])}, y

    def __call__(self, x_btc: jax.Array) -> jax.Array:
        return self.step(self.init_state(x_btc.shape[0], x_btc.dtype), x_btc)[1]

    def _conv(self, x_btc: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x_btc,
            self.kernel[...].astype(x_btc.dtype),
            window_strides=(self.stride,),
            padding="VALID",
            rhs_dilation=(self.dilation,),
            dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=self.groups,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class StreamingConvTranspose1d(nnx.Module):
    """Causal transposed conv1d (right trim of kernel - stride), computed as matmul + overlap-add.

    Kernel layout is [kernel, out, in/groups]: contracting over the last axis keeps XLA:CPU's
    matrix-vector kernel fast for the one- or two-step inputs of streaming decoding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
        use_bias: bool = True,
        param_dtype: str = "float32",
        rngs: nnx.Rngs,
    ) -> None:
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.groups = stride, groups
        # PyTorch's ConvTranspose1d uses fan_in = out_channels/groups * kernel for its init.
        shape = (kernel_size, out_channels, in_channels // groups)
        axes = ("conv_kernel", "conv_out", "conv_in")
        fan_in = out_channels // groups * kernel_size
        self.kernel, self.bias = _conv_params(rngs, shape, axes, fan_in, use_bias, param_dtype)

    @property
    def overlap(self) -> int:
        return self.kernel.shape[0] - self.stride

    def init_state(self, batch: int, dtype: Any = jnp.float32) -> State:
        return {"partial": jnp.zeros((batch, self.overlap, self.out_channels), dtype)}

    def step(self, state: State, x_btc: jax.Array) -> tuple[State, jax.Array]:
        full = self._full(x_btc)  # [B, T * stride + overlap, out], no bias
        n_out = x_btc.shape[1] * self.stride
        ov = self.overlap
        if ov:
            full = full.at[:, :ov].add(state["partial"].astype(full.dtype))
        y = full[:, :n_out]
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return {"partial": full[:, n_out:]}, y

    def __call__(self, x_btc: jax.Array) -> jax.Array:
        return self.step(self.init_state(x_btc.shape[0], x_btc.dtype), x_btc)[1]

    def _full(self, x_btc: jax.Array) -> jax.Array:
        """Untrimmed transposed conv: each input step adds kernel x in -> out at t * stride."""
        b, t, _ = x_btc.shape
        k, s, g = self.kernel.shape[0], self.stride, self.groups
        m = -(-k // s)  # kernel split into m blocks of `stride` taps
        w = self.kernel[...].astype(x_btc.dtype)
        w = jnp.pad(w, ((0, m * s - k), (0, 0), (0, 0)))
        w = w.reshape(m, s, g, self.out_channels // g, self.in_channels // g)
        x = x_btc.reshape(b, t, g, self.in_channels // g)
        z = jnp.einsum("btgi,msgoi->btmsgo", x, w).reshape(b, t, m, s, self.out_channels)
        # Block i of the kernel lands i frames later: shift each block and add (overlap-add).
        out = sum(jnp.pad(z[:, :, i], ((0, 0), (i, m - 1 - i), (0, 0), (0, 0))) for i in range(m))
        out = out.reshape(b, (t + m - 1) * s, self.out_channels)
        return out[:, : t * s + k - s]
