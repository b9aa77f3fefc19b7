"""Parity of the sfm codec with moshi's PyTorch Mimi on the same weights.

Every check runs at the full Mimi config and at a reduced one (same 1920-sample frame; its
attention context is shorter than the clip, so the streaming KV cache wraps around). Models
are built and compiled once per module; audio is 2.4 s (30 frames), batch 2.
"""

from __future__ import annotations

from functools import cached_property, partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from moshi.models import loaders
from safetensors.numpy import save_file
from safetensors.torch import load_file as load_torch_file

from sfm.codec.config import CodecConfig
from sfm.codec.streaming import StreamingCodec
from sfm.io.mimi import (
    export_mimi,
    import_mimi,
    model_to_flat,
    sfm_to_torch,
    torch_to_sfm,
)
from sfm.io.tensors import CheckpointError, InteropError
from sfm.testing.moshi_reference import (
    REDUCED_CONFIG,
    build_moshi_mimi,
    moshi_config,
    numpy_state_dict,
    speech_like,
    torch_decode,
    torch_encode,
    torch_stream,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BATCH = 2
FRAMES = 30
AUDIO_TOL = 1e-4
# sfm exports the fused attention projections under these names; moshi's state_dict splits
# them per step (one step here) and its load hook maps them back.
_ATTN_ALIASES = {
    "self_attn.in_proj_weight": "self_attn.in_projs.0.weight",
    "self_attn.out_proj.weight": "self_attn.out_projs.0.weight",
}
CONFIGS = {"full": CodecConfig(), "reduced": REDUCED_CONFIG}


@partial(jax.jit, static_argnums=(0,))
def _encode(graphdef: Any, state: Any, wav_bt: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).encode(wav_bt)


@partial(jax.jit, static_argnums=(0,))
def _decode(graphdef: Any, state: Any, codes_bkt: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).decode(codes_bkt)


def _stream(codec: StreamingCodec, wav_bt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sfm frame-by-frame encode, then decode of each frame: (codes [B, K, n], audio [B, T])."""
    fs = codec.cfg.frame_size
    codes, audio = [], []
    for i in range(wav_bt.shape[1] // fs):
        c = codec.encode_chunk(wav_bt[:, i * fs : (i + 1) * fs])
        codes.append(np.asarray(c))
        audio.append(np.asarray(codec.decode_chunk(c)))
    return np.concatenate(codes, axis=-1), np.concatenate(audio, axis=-1)


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def _alias(key: str) -> str:
    for fused, split in _ATTN_ALIASES.items():
        if key.endswith(fused):
            return key[: -len(fused)] + split
    return key


def _import_error(path: Path, cfg: CodecConfig, error: type[Exception] = InteropError) -> str:
    with pytest.raises(error) as err:
        import_mimi(path, cfg)
    return str(err.value)


class Pair:
    """A moshi Mimi and the sfm Mimi imported from its checkpoint, plus cached results."""

    def __init__(self, name: str, cfg: CodecConfig, tmp: Path) -> None:
        self.name, self.cfg, self.tmp = name, cfg, tmp
        self.torch_model = build_moshi_mimi(cfg)
        self.state_dict = numpy_state_dict(self.torch_model)
        # The moshi state dict written by safetensors alone: what a user's checkpoint is.
        self.checkpoint = tmp / f"{name}.safetensors"
        save_file(self.state_dict, str(self.checkpoint))
        self.model = import_mimi(self.checkpoint, cfg)
        self.graphdef, self.params = nnx.split(self.model)
        self.wav = speech_like(BATCH, FRAMES * cfg.frame_size / cfg.sample_rate, cfg.sample_rate)

    def encode(self, wav_bt: np.ndarray) -> np.ndarray:
        return np.asarray(_encode(self.graphdef, self.params, jnp.asarray(wav_bt)))

    def decode(self, codes_bkt: np.ndarray) -> np.ndarray:
        return np.asarray(_decode(self.graphdef, self.params, jnp.asarray(codes_bkt, jnp.int32)))

    @cached_property
    def codec(self) -> StreamingCodec:
        return StreamingCodec(self.model, BATCH)

    @cached_property
    def torch_codes(self) -> np.ndarray:
        return torch_encode(self.torch_model, self.wav)

    @cached_property
    def torch_streamed(self) -> tuple[np.ndarray, np.ndarray]:
        return torch_stream(self.torch_model, self.wav, self.cfg.frame_size)

    @cached_property
    def sfm_streamed(self) -> tuple[np.ndarray, np.ndarray]:
        self.codec.reset()
        return _stream(self.codec, self.wav)


class PairCache:
    """Pairs built on first use and shared by every test of the module."""

    def __init__(self, tmp_factory: pytest.TempPathFactory) -> None:
        self._tmp_factory = tmp_factory
        self._pairs: dict[str, Pair] = {}

    def __getitem__(self, name: str) -> Pair:
        if name not in self._pairs:
            tmp = self._tmp_factory.mktemp(f"mimi_{name}")
            self._pairs[name] = Pair(name, CONFIGS[name], tmp)
        return self._pairs[name]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> PairCache:
    return PairCache(tmp_path_factory)


@pytest.fixture(params=["full", "reduced"])
def pair(request: pytest.FixtureRequest, pairs: PairCache) -> Pair:
    return pairs[request.param]


# ---- offline and streaming parity ------------------------------------------------------------


def test_offline_codes_and_audio_match(pair: Pair) -> None:
    codes = pair.encode(pair.wav)
    assert codes.shape == (BATCH, pair.cfg.n_q, FRAMES)
    np.testing.assert_array_equal(codes, pair.torch_codes)
    diff = _max_diff(
        pair.decode(pair.torch_codes), torch_decode(pair.torch_model, pair.torch_codes)
    )
    assert diff < AUDIO_TOL, f"{pair.name}: offline decode differs by {diff}"


def test_streaming_matches_moshi_and_offline(pair: Pair) -> None:
    t_codes, t_audio = pair.torch_streamed
    s_codes, s_audio = pair.sfm_streamed
    np.testing.assert_array_equal(s_codes, t_codes)
    np.testing.assert_array_equal(s_codes, pair.encode(pair.wav))
    diff = _max_diff(s_audio, t_audio)
    assert diff < AUDIO_TOL, f"{pair.name}: streaming decode differs by {diff}"


def test_streaming_batch_of_one(pair: Pair) -> None:
    """A single session (how a server streams) compiles differently; it must agree too."""
    t_codes, t_audio = pair.torch_streamed
    codec = StreamingCodec(pair.model, 1)
    s_codes, s_audio = _stream(codec, pair.wav[:1])
    np.testing.assert_array_equal(s_codes, t_codes[:1])
    diff = _max_diff(s_audio, t_audio[:1])
    assert diff < AUDIO_TOL, f"{pair.name}: batch-1 streaming decode differs by {diff}"


def test_per_session_reset(pair: Pair) -> None:
    """Reset session 1 midway: session 0 is undisturbed, session 1 restarts from scratch."""
    fs, half = pair.cfg.frame_size, FRAMES // 2
    new_audio = speech_like(BATCH, half * fs / pair.cfg.sample_rate, seed=7)
    # Session 0 keeps its clip; session 1 switches to new audio at the reset.
    fed = pair.wav.copy()
    fed[1, half * fs :] = new_audio[1]
    codec = pair.codec
    codec.reset()
    first_codes, first_audio = _stream(codec, fed[:, : half * fs])
    codec.reset(jnp.array([False, True]))
    second_codes, second_audio = _stream(codec, fed[:, half * fs :])
    codes = np.concatenate([first_codes, second_codes], axis=-1)
    audio = np.concatenate([first_audio, second_audio], axis=-1)

    ref_codes, ref_audio = pair.sfm_streamed
    np.testing.assert_array_equal(codes[0], ref_codes[0])
    assert _max_diff(audio[0], ref_audio[0]) < 1e-6

    codec.reset()
    fresh_codes, fresh_audio = _stream(codec, new_audio)
    np.testing.assert_array_equal(second_codes[1], fresh_codes[1])
    assert _max_diff(second_audio[1], fresh_audio[1]) < 1e-6
    # ... and the restarted session still agrees with moshi on the new audio.
    np.testing.assert_array_equal(fresh_codes[1:], torch_encode(pair.torch_model, new_audio[1:]))


# ---- weights round trip ------------------------------------------------------------------------


def test_weights_round_trip(pair: Pair) -> None:
    back = sfm_to_torch(model_to_flat(pair.model), pair.cfg)
    back = {_alias(k): v for k, v in back.items()}
    assert set(back) == set(pair.state_dict)
    for key, ref in pair.state_dict.items():
        assert back[key].dtype == ref.dtype, key
        np.testing.assert_array_equal(back[key], ref, err_msg=key)


def test_export_loads_strictly_into_moshi(pair: Pair, tmp_path: Path) -> None:
    path = tmp_path / "exported.safetensors"
    export_mimi(pair.model, path)
    fresh = loaders.get_mimi(
        None, mimi_config=moshi_config(pair.cfg), device="cpu", num_codebooks=pair.cfg.n_q
    )
    fresh.load_state_dict(load_torch_file(str(path)), strict=True)
    fresh.eval()
    for key, value in fresh.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), pair.state_dict[key], err_msg=key)
    clip = pair.wav[:, : 6 * pair.cfg.frame_size]
    np.testing.assert_array_equal(torch_encode(fresh, clip), torch_encode(pair.torch_model, clip))


def test_import_of_moshi_checkpoint(pair: Pair) -> None:
    """`import_mimi` on the safetensors file equals converting the in-memory state dict."""
    flat, ref = model_to_flat(pair.model), torch_to_sfm(pair.state_dict, pair.cfg)
    assert set(flat) == set(ref)
    for key, value in ref.items():
        np.testing.assert_array_equal(flat[key], value, err_msg=key)


# ---- bad checkpoints ---------------------------------------------------------------------------


def test_truncated_checkpoint(pair: Pair, tmp_path: Path) -> None:
    data = pair.checkpoint.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    message = _import_error(path, pair.cfg, CheckpointError)
    assert message == f"{path}: not a readable safetensors file (truncated or corrupt)"


def test_missing_key(pair: Pair, tmp_path: Path) -> None:
    key = "decoder_transformer.transformer.layers.1.linear2.weight"
    path = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in pair.state_dict.items() if k != key}, str(path))
    message = _import_error(path, pair.cfg)
    assert str(path) in message and f"missing key {key}" in message


def test_misshapen_tensor(pair: Pair, tmp_path: Path) -> None:
    key = "encoder.model.0.conv.conv.bias"
    tensors = dict(pair.state_dict)
    tensors[key] = np.zeros(tensors[key].shape[0] + 1, tensors[key].dtype)
    path = tmp_path / "misshapen.safetensors"
    save_file(tensors, str(path))
    message = _import_error(path, pair.cfg)
    assert str(path) in message and "encoder/stages/0/bias" in message


def test_full_checkpoint_with_reduced_config(pairs: PairCache) -> None:
    checkpoint = pairs["full"].checkpoint
    message = _import_error(checkpoint, REDUCED_CONFIG)
    assert str(checkpoint) in message and "unexpected keys" in message


def test_reduced_checkpoint_with_full_config(pairs: PairCache) -> None:
    checkpoint = pairs["reduced"].checkpoint
    message = _import_error(checkpoint, CodecConfig())
    assert str(checkpoint) in message and "missing key" in message
