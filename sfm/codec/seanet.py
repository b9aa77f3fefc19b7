"""SEANet convolutional encoder and decoder (causal, streaming), Mimi layout."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from sfm.codec.config import SeanetConfig
from sfm.nn.conv import StreamingConv1d, StreamingConvTranspose1d

State = Any


class ResnetBlock(nnx.Module):
    """x + conv1x1(elu(conv_k(elu(x)))) with a dim // compress bottleneck (true skip)."""

    def __init__(
        self, dim: int, dilation: int, cfg: SeanetConfig, *, param_dtype: str, rngs: nnx.Rngs
    ):
        hidden = dim // cfg.compress
        kw: dict[str, Any] = dict(pad_mode=cfg.pad_mode, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = StreamingConv1d(dim, hidden, cfg.residual_kernel_size, dilation=dilation, **kw)
        self.conv2 = StreamingConv1d(hidden, dim, 1, **kw)

    def init_state(self, batch: int) -> State:
        return [self.conv1.init_state(batch), self.conv2.init_state(batch)]

    def step(self, state: State, x: jax.Array) -> tuple[State, jax.Array]:
        s1, h = self.conv1.step(state[0], jax.nn.elu(x))
        s2, h = self.conv2.step(state[1], jax.nn.elu(h))
        return [s1, s2], x + h


class _Elu(nnx.Module):
    """Stateless ELU stage so the encoder/decoder are one uniform list of streaming stages."""

    def init_state(self, batch: int) -> State:
        return ()

    def step(self, state: State, x: jax.Array) -> tuple[State, jax.Array]:
        return state, jax.nn.elu(x)


class _Stack(nnx.Module):
    """Runs a list of streaming stages in order."""

    stages: nnx.List

    def init_state(self, batch: int) -> State:
        return [stage.init_state(batch) for stage in self.stages]

    def step(self, state: State, x_btc: jax.Array) -> tuple[State, jax.Array]:
        new_state = []
        for stage, s in zip(self.stages, state, strict=True):
            s, x_btc = stage.step(s, x_btc)
            new_state.append(s)
        return new_state, x_btc

    def __call__(self, x_btc: jax.Array) -> jax.Array:
        return self.step(self.init_state(x_btc.shape[0]), x_btc)[1]


class SeanetEncoder(_Stack):
    """[B, T, channels] audio -> [B, T / hop, dimension] latents."""

    def __init__(self, cfg: SeanetConfig, *, param_dtype: str = "float32", rngs: nnx.Rngs):
        kw: dict[str, Any] = dict(pad_mode=cfg.pad_mode, param_dtype=param_dtype, rngs=rngs)
        mult, nf = 1, cfg.n_filters
        stages: list[nnx.Module] = [StreamingConv1d(cfg.channels, nf, cfg.kernel_size, **kw)]
        for ratio in reversed(cfg.ratios):
            for j in range(cfg.n_residual_layers):
                stages.append(
                    ResnetBlock(
                        mult * nf, cfg.dilation_base**j, cfg, param_dtype=param_dtype, rngs=rngs
                    )
                )
            stages.append(_Elu())
            stages.append(StreamingConv1d(mult * nf, 2 * mult * nf, 2 * ratio, stride=ratio, **kw))
            mult *= 2
        stages.append(_Elu())
        stages.append(StreamingConv1d(mult * nf, cfg.dimension, cfg.last_kernel_size, **kw))
        self.stages = nnx.List(stages)


class SeanetDecoder(_Stack):
    """[B, T / hop, dimension] latents -> [B, T, channels] audio."""

    def __init__(self, cfg: SeanetConfig, *, param_dtype: str = "float32", rngs: nnx.Rngs):
        kw: dict[str, Any] = dict(pad_mode=cfg.pad_mode, param_dtype=param_dtype, rngs=rngs)
        nf = cfg.n_filters
        mult = 2 ** len(cfg.ratios)
        stages: list[nnx.Module] = [
            StreamingConv1d(cfg.dimension, mult * nf, cfg.kernel_size, **kw)
        ]
        for ratio in cfg.ratios:
            stages.append(_Elu())
            stages.append(
                StreamingConvTranspose1d(
                    mult * nf,
                    mult * nf // 2,
                    2 * ratio,
                    stride=ratio,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
            )
            for j in range(cfg.n_residual_layers):
                stages.append(
                    ResnetBlock(
                        mult * nf // 2,
                        cfg.dilation_base**j,
                        cfg,
                        param_dtype=param_dtype,
                        rngs=rngs,
                    )
                )
            mult //= 2
        stages.append(_Elu())
        stages.append(StreamingConv1d(nf, cfg.channels, cfg.last_kernel_size, **kw))
        self.stages = nnx.List(stages)
