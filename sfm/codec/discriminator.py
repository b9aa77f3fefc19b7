"""Discriminators for adversarial codec training: multi-scale STFT and (optional) multi-period.

Each sub-discriminator maps audio [B, T] to logits and the feature maps of its hidden layers
(for the feature-matching loss). The STFT discriminator looks at the complex spectrogram
(real and imaginary parts as two channels) at one resolution with a small 2-d conv stack
over (time, frequency); the period discriminator folds the waveform into [T / p, p] and
convolves along time only. Layouts are NHWC: [batch, time, frequency or period, channels].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sfm.codec.config import DiscConfig
from sfm.codec.mel import stft
from sfm.nn import init

Logits = list[jax.Array]
Features = list[list[jax.Array]]
LEAK = 0.2


class Conv2d(nnx.Module):
    """2-d convolution, NHWC, 'same' padding; kernel [kh, kw, in, out]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int],
        *,
        stride: tuple[int, int] = (1, 1),
        dilation: tuple[int, int] = (1, 1),
        rngs: nnx.Rngs,
    ) -> None:
        bound = 1.0 / math.sqrt(in_channels * kernel[0] * kernel[1])
        shape = (*kernel, in_channels, out_channels)
        axes = ("conv_kernel", "conv_kernel", "conv_in", "conv_out")
        self.kernel = nnx.Param(init.uniform(rngs, shape, bound, "float32"), **init.logical(axes))
        bias = init.uniform(rngs, (out_channels,), bound, "float32")
        self.bias = nnx.Param(bias, **init.logical(("conv_out",)))
        self.stride, self.dilation = stride, dilation

    def __call__(self, x: jax.Array) -> jax.Array:
        pad = [((k - 1) * d // 2, (k - 1) * d - (k - 1) * d // 2) for k, d in self._kd()]
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...].astype(x.dtype),
            window_strides=self.stride,
            padding=pad,
            rhs_dilation=self.dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...].astype(y.dtype)

    def _kd(self) -> list[tuple[int, int]]:
        return list(zip(self.kernel.shape[:2], self.dilation))


def _stack(convs: nnx.List, post: Conv2d, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """Leaky-ReLU conv stack; returns the logits and every hidden activation."""
    feats = []
    for conv in convs:
        x = jax.nn.leaky_relu(conv(x), LEAK)
        feats.append(x)
    logits = post(x)
    return logits, [*feats, logits]


class STFTDiscriminator(nnx.Module):
    """Conv stack over one resolution's complex spectrogram (EnCodec's MS-STFT-D layout):
    kernels (3, 9) over (time, frequency), frequency stride 2, time dilation growing."""

    def __init__(
        self, n_fft: int, filters: int, dilations: tuple[int, ...], *, rngs: nnx.Rngs
    ) -> None:
        self.n_fft, self.hop = n_fft, n_fft // 4
        convs = [Conv2d(2, filters, (3, 9), rngs=rngs)]
        for d in dilations:
            convs.append(
                Conv2d(filters, filters, (3, 9), stride=(1, 2), dilation=(d, 1), rngs=rngs)
            )
        convs.append(Conv2d(filters, filters, (3, 3), rngs=rngs))
        self.convs = nnx.List(convs)
        self.post = Conv2d(filters, 1, (3, 3), rngs=rngs)

    def __call__(self, wav_bt: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        spec = stft(wav_bt, self.n_fft, self.hop, center=False) / jnp.sqrt(self.n_fft * 0.375)
        x = jnp.stack([spec.real, spec.imag], axis=-1)  # [B, frames, freqs, 2]
        return _stack(self.convs, self.post, x)


class PeriodDiscriminator(nnx.Module):
    """HiFi-GAN style: the waveform folded to [T / p, p], kernels (5, 1), time stride 3."""

    def __init__(self, period: int, filters: int, *, rngs: nnx.Rngs) -> None:
        self.period = period
        chans = [1, filters, 2 * filters, 4 * filters, 4 * filters]
        self.convs = nnx.List(
            [
                Conv2d(a, b, (5, 1), stride=(3 if i < 3 else 1, 1), rngs=rngs)
                for i, (a, b) in enumerate(zip(chans[:-1], chans[1:]))
            ]
        )
        self.post = Conv2d(chans[-1], 1, (3, 1), rngs=rngs)

    def __call__(self, wav_bt: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        b, t = wav_bt.shape
        p = self.period
        x = jnp.pad(wav_bt, ((0, 0), (0, -t % p)), mode="reflect" if t >= p else "constant")
        return _stack(self.convs, self.post, x.reshape(b, -1, p, 1))


class MultiDiscriminator(nnx.Module):
    """Every sub-discriminator of `cfg`; returns per-discriminator logits and features."""

    def __init__(self, cfg: DiscConfig, *, rngs: nnx.Rngs) -> None:
        if not cfg.n_ffts and not cfg.periods:
            raise ValueError("codec_train.disc: needs at least one n_fft or period")
        self.stfts = nnx.List(
            [STFTDiscriminator(n, cfg.filters, cfg.dilations, rngs=rngs) for n in cfg.n_ffts]
        )
        self.periods = nnx.List(
            [PeriodDiscriminator(p, cfg.period_filters, rngs=rngs) for p in cfg.periods]
        )

    def __call__(self, wav_bt: jax.Array) -> tuple[Logits, Features]:
        logits, feats = [], []
        for disc in [*self.stfts, *self.periods]:
            out, f = disc(wav_bt)
            logits.append(out)
            feats.append(f)
        return logits, feats
