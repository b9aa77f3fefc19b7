"""The PyTorch reference side of the parity tests and benchmarks: a moshi Mimi built from an
sfm `CodecConfig`, random codebooks, numpy state dicts and test audio.

Only tests and benchmarks import this module (it imports torch and moshi).
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from moshi.models import loaders  # noqa: E402
from moshi.models.compression import MimiModel  # noqa: E402

from sfm.codec.config import (  # noqa: E402
    CodecConfig,
    CodecTransformerConfig,
    QuantizerConfig,
    SeanetConfig,
)
from sfm.codec.model import Mimi  # noqa: E402
from sfm.io.mimi import moshi_config, torch_to_sfm  # noqa: E402

# A small Mimi with the real frame size (1920 samples at 24 kHz) for fast parity tests. Its
# attention context (40 steps = 1.6 s at 25 Hz) is shorter than the test clips, so streaming
# runs through the wrap-around of the KV cache.
REDUCED_CONFIG = CodecConfig(
    n_q=8,
    seanet=SeanetConfig(dimension=64, n_filters=16, ratios=(8, 6, 5, 4)),
    transformer=CodecTransformerConfig(
        d_model=64, num_heads=4, num_layers=2, dim_feedforward=128, context=40
    ),
    quantizer=QuantizerConfig(dimension=32, total_codebooks=8, bins=256),
)


def build_moshi_mimi(cfg: CodecConfig, seed: int = 0) -> MimiModel:
    """A random moshi Mimi (eval mode, CPU) shaped like `cfg`, with usable codebooks.

    A fresh moshi Mimi has all-zero codebooks; they get random centroids, positive usage
    and the initialized flag so that encoding exercises real nearest-neighbour search.
    """
    torch.manual_seed(seed)
    model = loaders.get_mimi(
        None, mimi_config=moshi_config(cfg), device="cpu", num_codebooks=cfg.n_q
    )
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("embedding_sum"):
                buf.copy_(torch.randn_like(buf))
            elif name.endswith("cluster_usage"):
                buf.copy_(torch.rand_like(buf) + 0.5)
            elif name.endswith("_initialized"):
                buf.fill_(1)
    return model.eval()


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The module's state dict as contiguous numpy arrays."""
    return {
        k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in model.state_dict().items()
    }


def sfm_from_state_dict(state_dict: dict[str, np.ndarray], cfg: CodecConfig) -> Mimi:
    """An sfm Mimi holding the converted weights, built without a random initialisation.

    Eager random init compiles one small program per parameter shape (about 25 s for the
    full Mimi on 2 cores); filling an abstract model skips it.
    """
    flat = torch_to_sfm(state_dict, cfg)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Mimi(cfg, rngs=nnx.Rngs(0))))
    variables = nnx.to_flat_state(state)
    for path, var in variables:
        abstract = var.get_value()
        value = jnp.asarray(flat["/".join(str(p) for p in path)], abstract.dtype)
        assert value.shape == abstract.shape, (path, value.shape, abstract.shape)
        var.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(variables))


def speech_like(batch: int, seconds: float, sample_rate: int = 24000, seed: int = 0) -> np.ndarray:
    """[batch, T] float32: voiced harmonics with a gliding pitch, a syllable envelope and noise.

    Each item has its own pitch, formant weights and syllable rate.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    out = np.empty((batch, t.size), np.float32)
    for b in range(batch):
        f0 = rng.uniform(90.0, 220.0) * (1.0 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t))
        phase = 2 * np.pi * np.cumsum(f0) / sample_rate
        voice = sum(rng.uniform(0.2, 1.0) / h * np.sin(h * phase) for h in range(1, 7))
        syllables = np.clip(
            np.sin(2 * np.pi * rng.uniform(2.5, 5.0) * t + rng.uniform(0, 6)), 0, None
        )
        wav = 0.3 * voice * syllables**0.7 + 0.01 * rng.standard_normal(t.size)
        out[b] = wav.astype(np.float32)
    return out


def torch_encode(model: MimiModel, wav_bt: np.ndarray) -> np.ndarray:
    """Offline moshi encode: [B, T] -> [B, K, frames] int."""
    with torch.no_grad():
        return model.encode(torch.from_numpy(wav_bt)[:, None]).numpy()


def torch_decode(model: MimiModel, codes_bkt: np.ndarray) -> np.ndarray:
    """Offline moshi decode: [B, K, frames] -> [B, T]."""
    with torch.no_grad():
        return model.decode(torch.from_numpy(codes_bkt).long())[:, 0].numpy()


def torch_stream(
    model: MimiModel, wav_bt: np.ndarray, frame_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Streaming moshi encode and decode, one frame at a time: (codes [B, K, n], audio [B, T])."""
    batch, n = wav_bt.shape[0], wav_bt.shape[1] // frame_size
    codes, audio = [], []
    with torch.no_grad(), model.streaming(batch_size=batch):
        for i in range(n):
            chunk = torch.from_numpy(wav_bt[:, i * frame_size : (i + 1) * frame_size])[:, None]
            c = model.encode(chunk)
            codes.append(c.numpy())
            audio.append(model.decode(c)[:, 0].numpy())
    return np.concatenate(codes, axis=-1), np.concatenate(audio, axis=-1)


# ---- Moshi LM --------------------------------------------------------------------------------


# moshi/tests/test_lm.py's `_get_lm` config, verbatim (sfm cannot express several of its
# options: layer norm, sinusoidal positions, shared depformer steps, low-rank embeddings).
MOSHI_TEST_KWARGS: dict[str, Any] = dict(
    delays=[0, 1, 2, 4], n_q=3, dep_q=3, card=32, text_card=48, dim=16, num_layers=2,
    num_heads=1, hidden_scale=1, depformer_dim=16, depformer_multi_linear=True,
    depformer_weights_per_step=True, depformer_weights_per_step_schedule=[0, 1, 1],
    depformer_low_rank_embeddings=8, depformer_num_heads=1, depformer_gating="silu", context=4,
)  # fmt: skip
# The same, made sfm-compatible: both speakers' codebooks, RMSNorm, SiLU gating, RoPE.
TINY = dict(
    MOSHI_TEST_KWARGS,
    n_q=6,
    delays=[0, 1, 2, 4, 1, 2, 4],
    depformer_weights_per_step_schedule=None,
    depformer_low_rank_embeddings=None,
    norm="rms_norm_f32",
    gating="silu",
    positional_embedding="rope",
    depformer_pos_emb="none",
)
# Grouped-query attention, moshi's 21/8 gated width (hidden_scale 4), rms_norm (eps 1e-5).
GQA = dict(
    TINY, dim=32, num_heads=4, kv_repeat=2, hidden_scale=4, norm="rms_norm", depformer_dim=16,
    depformer_num_heads=2, context=6,
)  # fmt: skip
# Moshi 7B's options at reduced size.
SEVEN_B_SHAPED = dict(
    loaders._lm_kwargs,
    dim=256,
    num_heads=4,
    num_layers=4,
    depformer_dim=128,
    depformer_num_heads=2,
    depformer_num_layers=2,
    depformer_dim_feedforward=int(4.125 * 128),
    text_card=4000,
    context=250,
)
MOSHI_LM_CONFIGS = {"tiny": TINY, "gqa": GQA, "7b_shaped": SEVEN_B_SHAPED}


def build_moshi_lm(lm_kwargs: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """A random float32 moshi LMModel (eval mode, CPU) with random RMSNorm scales.

    moshi initialises every norm scale to 1, which would hide a misplaced norm weight."""
    torch.manual_seed(seed)
    model = loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".alpha"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    return model.eval()


def random_lm_codes(
    lm_kwargs: dict[str, Any], batch: int, frames: int, seed: int = 0
) -> np.ndarray:
    """Undelayed codes [B, 1 + n_q, T] for a moshi LMModel: random text and audio tokens; the
    user's codebooks are absent (-1, the zero token) over the first few frames of item 0."""
    rng = np.random.default_rng(seed)
    n_q = lm_kwargs["n_q"]
    text = rng.integers(0, lm_kwargs["text_card"], (batch, 1, frames))
    audio = rng.integers(0, lm_kwargs["card"], (batch, n_q, frames))
    audio[0, n_q // 2 :, : frames // 4] = -1
    return np.concatenate([text, audio], axis=1).astype(np.int64)
