"""Mimi-compatible codec: SEANet -> transformer -> 25->12.5 Hz -> split RVQ, and back.

Offline `encode`/`decode` equal the streaming `encode_step`/`decode_step` run frame by frame.
Audio is [B, T] at `cfg.sample_rate`; codes are [B, K, frames] int32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sfm.codec.config import CodecConfig
from sfm.codec.quantizer import QuantizeResult, SplitResidualVQ
from sfm.codec.seanet import SeanetDecoder, SeanetEncoder
from sfm.nn.conv import StreamingConv1d, StreamingConvTranspose1d
from sfm.nn.transformer import Transformer

State = dict[str, Any]


def _codec_transformer(cfg: CodecConfig, rngs: nnx.Rngs) -> Transformer:
    t = cfg.transformer
    return Transformer(
        t.num_layers,
        t.d_model,
        context=t.context,
        num_heads=t.num_heads,
        dim_feedforward=t.dim_feedforward,
        max_period=t.max_period,
        layer_scale=t.layer_scale,
        norm="layer_norm",
        norm_eps=t.norm_eps,
        param_dtype=cfg.param_dtype,
        attention_impl=t.attention_impl,
        rngs=rngs,
    )


class Mimi(nnx.Module):
    """The codec. `cfg.n_q` codebooks are produced by `encode` (any prefix decodes)."""

    def __init__(self, cfg: CodecConfig, *, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        dim, stride, pd = cfg.seanet.dimension, cfg.resample_stride, cfg.param_dtype
        self.encoder = SeanetEncoder(cfg.seanet, param_dtype=pd, rngs=rngs)
        self.encoder_transformer = _codec_transformer(cfg, rngs)
        self.downsample = StreamingConv1d(
            dim,
            dim,
            2 * stride,
            stride=stride,
            use_bias=False,
            pad_mode="replicate",
            param_dtype=pd,
            rngs=rngs,
        )
        self.quantizer = SplitResidualVQ(dim, cfg.quantizer, rngs=rngs)
        self.upsample = StreamingConvTranspose1d(
            dim,
            dim,
            2 * stride,
            stride=stride,
            groups=dim,
            use_bias=False,
            param_dtype=pd,
            rngs=rngs,
        )
        self.decoder_transformer = _codec_transformer(cfg, rngs)
        self.decoder = SeanetDecoder(cfg.seanet, param_dtype=pd, rngs=rngs)

    # ---- offline -------------------------------------------------------------------------
    def pad_to_frames(self, wav_bt: jax.Array) -> jax.Array:
        """Right-pad with zeros to a whole number of frames."""
        fs = self.cfg.frame_size
        return jnp.pad(wav_bt, ((0, 0), (0, -wav_bt.shape[1] % fs)))

    def encode_latent(self, wav_bt: jax.Array) -> jax.Array:
        """[B, T] audio -> [B, frames, dim] unquantized latents at the frame rate."""
        x = self.encoder(self.pad_to_frames(wav_bt)[..., None])
        return self.downsample(self.encoder_transformer(x))

    def encode(self, wav_bt: jax.Array, n_q: int | None = None) -> jax.Array:
        return self.quantizer.encode(self.encode_latent(wav_bt), n_q or self.cfg.n_q)

    def decode_latent(self, latent_btd: jax.Array) -> jax.Array:
        x = self.decoder_transformer(self.upsample(latent_btd))
        return self.decoder(x)[..., 0]

    def decode(self, codes_bkt: jax.Array) -> jax.Array:
        return self.decode_latent(self.quantizer.decode(codes_bkt))

    def __call__(self, wav_bt: jax.Array, key: jax.Array) -> tuple[jax.Array, QuantizeResult]:
        """Training pass: reconstruction [B, T] and the quantizer result (EMA codebooks update)."""
        q = self.quantizer.train_forward(self.encode_latent(wav_bt), self.cfg.n_q, key)
        return self.decode_latent(q.quantized)[:, : wav_bt.shape[1]], q

    def freeze_codebooks(self) -> None:
        """Precompute every codebook's centroids for inference (see EuclideanCodebook.freeze)."""
        for rvq in (self.quantizer.rvq_first, self.quantizer.rvq_rest):
            for codebook in rvq.layers:
                codebook.freeze()

    # ---- streaming -----------------------------------------------------------------------
    @property
    def _kv_capacity(self) -> int:
        """Context plus the extra transformer steps of one frame: frame-by-frame streaming
        then writes each step into the ring before attending, with no cache copy."""
        return self.cfg.transformer.context + self.cfg.resample_stride - 1

    def init_encode_state(self, batch: int) -> State:
        return {
            "encoder": self.encoder.init_state(batch),
            "transformer": self.encoder_transformer.init_state(batch, self._kv_capacity),
            "downsample": self.downsample.init_state(batch),
        }

    def encode_step(
        self, state: State, wav_bt: jax.Array, n_q: int | None = None
    ) -> tuple[State, jax.Array]:
        """Encode a chunk whose length is a multiple of the frame size."""
        if wav_bt.shape[1] % self.cfg.frame_size:
            raise ValueError(
                f"encode_step: chunk of {wav_bt.shape[1]} samples is not a multiple of "
                f"{self.cfg.frame_size}"
            )
        s_enc, x = self.encoder.step(state["encoder"], wav_bt[..., None])
        s_tr, x = self.encoder_transformer.step(state["transformer"], x)
        s_down, x = self.downsample.step(state["downsample"], x)
        codes = self.quantizer.encode(x, n_q or self.cfg.n_q)
        return {"encoder": s_enc, "transformer": s_tr, "downsample": s_down}, codes

    def init_decode_state(self, batch: int) -> State:
        return {
            "upsample": self.upsample.init_state(batch),
            "transformer": self.decoder_transformer.init_state(batch, self._kv_capacity),
            "decoder": self.decoder.init_state(batch),
        }

    def decode_step(self, state: State, codes_bkt: jax.Array) -> tuple[State, jax.Array]:
        """Decode a chunk of frames to frames * frame_size samples."""
        s_up, x = self.upsample.step(state["upsample"], self.quantizer.decode(codes_bkt))
        s_tr, x = self.decoder_transformer.step(state["transformer"], x)
        s_dec, y = self.decoder.step(state["decoder"], x)
        return {"upsample": s_up, "transformer": s_tr, "decoder": s_dec}, y[..., 0]
