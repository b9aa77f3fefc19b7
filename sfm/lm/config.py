"""Typed configuration of the multi-stream speech-text LM. Defaults equal Kyutai's Moshi 7B."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from sfm.lm.layout import TEXT_EPAD, TEXT_PAD, StreamLayout, check_delays, moshi_delays


def gated_hidden(dim_feedforward: int) -> int:
    """Hidden width of a SiLU-gated MLP with Moshi's `dim_feedforward` convention (2/3)."""
    return 2 * dim_feedforward // 3


def feedforward_for(hidden: int) -> int:
    """The smallest `dim_feedforward` whose gated hidden width is `hidden`."""
    return (3 * hidden + 1) // 2


@dataclasses.dataclass(frozen=True)
class TemporalConfig:
    """The temporal (backbone) transformer over frames."""

    dim: int = 4096
    num_heads: int = 32
    num_kv_heads: int | None = None  # grouped-query attention when < num_heads
    num_layers: int = 32
    dim_feedforward: int = 16896  # 4.125 * dim; the gated hidden width is 2/3 of it
    context: int = 3000
    max_period: float = 10000.0
    norm_eps: float = 1e-8
    remat: Literal["none", "full", "dots"] = "full"
    # Layers per iteration of the layer scan in the teacher-forced pass (True: all, unrolled).
    scan_unroll: bool | int = False
    # False: one parameter set per layer and a Python loop instead of stacked parameters and
    # a scan (sfm.lm.layers.LayerStack; a different checkpoint layout).
    scan_layers: bool = True

    @property
    def hidden(self) -> int:
        return gated_hidden(self.dim_feedforward)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


@dataclasses.dataclass(frozen=True)
class DepthConfig:
    """The depth transformer over the codebooks of one frame.

    kind "moshi": text first, then one step per codebook, a separate input projection and
    separate layer weights per step, no positional embedding.
    kind "csm": codebook 0 from the temporal output; a shared decoder (RoPE) predicts
    codebooks 1.. with per-codebook heads; trained on a random 1/`amortize_every` of frames.
    """

    kind: Literal["moshi", "csm"] = "moshi"
    dim: int = 1024
    num_heads: int = 16
    num_kv_heads: int | None = None
    num_layers: int = 6
    dim_feedforward: int = 4224
    max_period: float | None = None  # RoPE over the codebook index ("csm"), None for none
    norm_eps: float = 1e-8
    amortize_every: int = 1  # train the decoder on 1/N of the frames ("csm")
    # Layers per iteration of the layer scan in the teacher-forced pass (True: all, unrolled).
    scan_unroll: bool | int = False
    # False: one parameter set per layer and a Python loop instead of stacked parameters and
    # a scan (sfm.lm.layers.LayerStack; a different checkpoint layout).
    scan_layers: bool = True

    @property
    def hidden(self) -> int:
        return gated_hidden(self.dim_feedforward)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Cross-entropy weights (Moshi: semantic 100, acoustic 1, text 1, text padding 0.5)."""

    text: float = 1.0
    text_pad: float = 0.5
    semantic: float = 100.0
    acoustic: float = 1.0


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the LM's tokens are drawn when it generates (`sampling:`; Moshi's defaults): the
    top-k logits, then temperature; temperature 0 or `greedy` means argmax. A run stores
    its sampling with its config, so the engine, the server and every evaluation draw the
    model's tokens with the settings the model is meant to be served with."""

    temp: float = 0.8  # audio codebooks
    top_k: int = 250  # 0, or >= the codebook size: the whole distribution
    temp_text: float = 0.7
    top_k_text: int = 25
    greedy: bool = False

    def __post_init__(self) -> None:
        for name in ("temp", "top_k", "temp_text", "top_k_text"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"sampling.{name}: must be a number >= 0, got {value}")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """The whole LM: vocabularies, stream layout, both transformers, loss weights.

    Streams are [text, n_q model codebooks, n_q user codebooks]; `dep_q` of the model's
    codebooks are predicted (the user's are inputs only).
    """

    text_card: int = 32000
    card: int = 2048
    n_q: int = 8
    dep_q: int = 8
    delays: tuple[int, ...] = moshi_delays(8)
    text_pad: int = TEXT_PAD
    text_epad: int = TEXT_EPAD
    temporal: TemporalConfig = TemporalConfig()
    depth: DepthConfig = DepthConfig()
    loss: LossConfig = LossConfig()
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; norms and softmax stay float32
    # "xla": the pure-JAX references; "pallas": the kernels of sfm.kernels (fused depth
    # frame, grouped per-codebook matmuls, JAX's attention kernels); see sfm/kernels.
    attention_impl: Literal["xla", "pallas"] = "xla"

    def __post_init__(self) -> None:
        check_delays(self.delays, self.n_q, "lm.delays")
        if not 1 <= self.dep_q <= self.n_q:
            raise ValueError(f"lm.dep_q: {self.dep_q} must lie in [1, lm.n_q={self.n_q}]")
        for name, t in (("temporal", self.temporal), ("depth", self.depth)):
            if t.dim % t.num_heads or t.num_heads % t.kv_heads:
                raise ValueError(
                    f"lm.{name}.num_heads: {t.num_heads} must divide dim {t.dim} and be a "
                    f"multiple of num_kv_heads {t.kv_heads}"
                )
            if not isinstance(t.scan_unroll, bool) and t.scan_unroll < 1:
                raise ValueError(
                    f"lm.{name}.scan_unroll: must be true, false or >= 1, got {t.scan_unroll}"
                )
            if not t.scan_layers and t.scan_unroll is not False:
                raise ValueError(
                    f"lm.{name}.scan_unroll: unrolls the layer scan; lm.{name}.scan_layers is "
                    "false (no scan)"
                )
        if self.depth.kind == "csm" and self.dep_q < 2:
            raise ValueError("lm.dep_q: the csm depth decoder needs at least 2 codebooks")
        if self.depth.amortize_every < 1:
            raise ValueError(
                f"lm.depth.amortize_every: must be >= 1, got {self.depth.amortize_every}"
            )

    def with_scan_layers(self, scan_layers: bool) -> LMConfig:
        """This config with both transformers' parameter layout set (`scan_layers`); without
        a scan there is nothing to unroll, so `scan_unroll` goes to false."""
        layout: dict[str, bool] = {"scan_layers": scan_layers}
        if not scan_layers:
            layout["scan_unroll"] = False
        return dataclasses.replace(
            self,
            temporal=dataclasses.replace(self.temporal, **layout),
            depth=dataclasses.replace(self.depth, **layout),
        )

    @property
    def layout(self) -> StreamLayout:
        """The stream layout of this LM: the one data records are built in."""
        return StreamLayout(
            n_q=self.n_q, delays=self.delays, text_pad=self.text_pad, text_epad=self.text_epad
        )

    @property
    def n_streams(self) -> int:
        """1 text stream + n_q model codebooks + n_q user codebooks."""
        return 1 + 2 * self.n_q

    @property
    def n_audio(self) -> int:
        """Audio streams the temporal transformer embeds (model's and user's)."""
        return 2 * self.n_q

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def text_initial(self) -> int:
        """Token fed for the text stream before the first frame (= text_card)."""
        return self.text_card

    @property
    def audio_initial(self) -> int:
        """Token fed for audio streams before the first frame (= card)."""
        return self.card
