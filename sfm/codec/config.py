"""Typed configuration of the Mimi-compatible codec. Defaults equal Kyutai's Mimi."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

# (window size, mel bands) of each log-mel scale; the hop is a quarter window.
MEL_SCALES: tuple[tuple[int, int], ...] = ((512, 64), (1024, 80), (2048, 128))


@dataclasses.dataclass(frozen=True)
class SeanetConfig:
    """SEANet convolutional encoder/decoder (ratios in decoder order, as Mimi)."""

    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    n_residual_layers: int = 1
    dilation_base: int = 2
    compress: int = 2
    true_skip: bool = True
    pad_mode: str = "constant"

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)


@dataclasses.dataclass(frozen=True)
class CodecTransformerConfig:
    """The causal transformers after the encoder and before the decoder (at 25 Hz)."""

    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    layer_scale: float = 0.01
    context: int = 250
    max_period: float = 10000.0
    norm_eps: float = 1e-5
    attention_impl: Literal["xla"] = "xla"  # sfm.nn.attention.attention's implementation


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
    """Split RVQ: `n_q_semantic` semantic codebooks, the rest acoustic, each on the same input."""

    dimension: int = 256
    total_codebooks: int = 32
    n_q_semantic: int = 1
    bins: int = 2048
    decay: float = 0.99
    epsilon: float = 1e-5
    threshold_usage_ratio: float = 0.1
    replaced_usage_ratio: float = 1.0
    q_dropout: bool = False


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    """The whole codec. `n_q` is the number of codebooks used by encode (Moshi: 8)."""

    sample_rate: int = 24000
    frame_rate: float = 12.5
    n_q: int = 8
    seanet: SeanetConfig = SeanetConfig()
    transformer: CodecTransformerConfig = CodecTransformerConfig()
    quantizer: QuantizerConfig = QuantizerConfig()
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.transformer.d_model != self.seanet.dimension:
            raise ValueError(
                f"codec.transformer.d_model: {self.transformer.d_model} must equal "
                f"codec.seanet.dimension {self.seanet.dimension}"
            )
        q = self.quantizer
        if not q.n_q_semantic <= self.n_q <= q.total_codebooks:
            raise ValueError(
                f"codec.n_q: {self.n_q} must lie in [{q.n_q_semantic}, {q.total_codebooks}]"
            )
        if self.sample_rate % self.seanet.hop_length:
            raise ValueError(
                f"codec.seanet.ratios: hop {self.seanet.hop_length} does not divide "
                f"sample_rate {self.sample_rate}"
            )
        stride = self.encoder_frame_rate / self.frame_rate
        if stride != int(stride) or stride < 1:
            raise ValueError(
                f"codec.frame_rate: {self.frame_rate} must divide the encoder rate "
                f"{self.encoder_frame_rate} by an integer"
            )
        if self.transformer.d_model % self.transformer.num_heads:
            raise ValueError("codec.transformer.num_heads: must divide d_model")

    @property
    def encoder_frame_rate(self) -> float:
        return self.sample_rate / self.seanet.hop_length

    @property
    def resample_stride(self) -> int:
        return int(self.encoder_frame_rate / self.frame_rate)

    @property
    def frame_size(self) -> int:
        """Samples per codec frame (1920 = 80 ms for Mimi)."""
        return int(self.sample_rate / self.frame_rate)


@dataclasses.dataclass(frozen=True)
class DiscConfig:
    """Sub-discriminators: one STFT discriminator per FFT size, one period one per period."""

    n_ffts: tuple[int, ...] = (2048, 1024, 512)
    filters: int = 32
    dilations: tuple[int, ...] = (1, 2, 4)
    periods: tuple[int, ...] = ()
    period_filters: int = 32
