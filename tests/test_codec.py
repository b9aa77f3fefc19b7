"""The tiny codec: streaming equals offline, batching, training pass, sharding, sizes."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfm.codec.config import CodecConfig, QuantizerConfig
from sfm.codec.model import Mimi
from sfm.codec.streaming import StreamingCodec
from sfm.config import load_config
from sfm.parallel.config import DEFAULT_RULES, MeshConfig
from sfm.parallel.mesh import build_mesh
from sfm.parallel.rules import shard_model

TINY = load_config(Path(__file__).parents[1] / "configs/codec/tiny.yaml", []).codec
FRAMES = 40


def _randomize_codebooks(model: Mimi, seed: int = 1) -> None:
    layers = [*model.quantizer.rvq_first.layers, *model.quantizer.rvq_rest.layers]
    for i, cb in enumerate(layers):
        cb.embedding_sum[...] = jax.random.normal(jax.random.key(seed + i), cb.embedding_sum.shape)


@pytest.fixture(scope="module")
def model() -> Mimi:
    m = Mimi(TINY, rngs=nnx.Rngs(0))
    _randomize_codebooks(m)
    return m


@pytest.fixture(scope="module")
def wav() -> jax.Array:
    t = jnp.arange(TINY.frame_size * FRAMES) / TINY.sample_rate
    tone = jnp.stack(
        [jnp.sin(2 * jnp.pi * 220 * t), jnp.sin(2 * jnp.pi * 330 * t) * jnp.cos(3 * t)]
    )
    return 0.3 * tone + 0.05 * jax.random.normal(jax.random.key(0), tone.shape)


@pytest.fixture(scope="module")
def offline(model: Mimi, wav: jax.Array) -> tuple[jax.Array, jax.Array]:
    codes = jax.jit(lambda w: model.encode(w))(wav)
    return codes, jax.jit(lambda c: model.decode(c))(codes)


def test_shapes(offline):
    codes, audio = offline
    assert codes.shape == (2, TINY.n_q, FRAMES) and codes.dtype == jnp.int32
    assert audio.shape == (2, FRAMES * TINY.frame_size)
    assert int(codes.max()) < TINY.quantizer.bins


def test_partial_frame_is_padded(model: Mimi, wav: jax.Array, offline):
    codes = jax.jit(lambda w: model.encode(w))(wav[:, : TINY.frame_size * 3 + 7])
    assert codes.shape[-1] == 4
    np.testing.assert_array_equal(codes[..., :3], offline[0][..., :3])


@pytest.mark.parametrize("chunk_frames", [1, 4])
def test_streaming_equals_offline(model: Mimi, wav: jax.Array, offline, chunk_frames: int):
    codes, audio = offline
    codec = StreamingCodec(model, batch_size=2)
    step = chunk_frames * TINY.frame_size
    streamed = jnp.concatenate(
        [codec.encode_chunk(wav[:, i : i + step]) for i in range(0, wav.shape[1], step)], -1
    )
    np.testing.assert_array_equal(streamed, codes)
    decoded = jnp.concatenate(
        [
            codec.decode_chunk(codes[..., i : i + chunk_frames])
            for i in range(0, FRAMES, chunk_frames)
        ],
        -1,
    )
    np.testing.assert_allclose(decoded, audio, atol=1e-5)


def test_per_session_reset(model: Mimi, wav: jax.Array, offline):
    """Resetting session 1 midway leaves session 0 untouched and restarts session 1."""
    codes, _ = offline
    codec = StreamingCodec(model, batch_size=2)
    fs, half = TINY.frame_size, FRAMES // 2
    first = codec.encode_chunk(wav[:, : half * fs])
    codec.reset(jnp.array([False, True]))
    second = codec.encode_chunk(wav[:, half * fs :])
    np.testing.assert_array_equal(jnp.concatenate([first, second], -1)[0], codes[0])
    fresh = jax.jit(lambda w: model.encode(w))(wav[1:, half * fs :])
    np.testing.assert_array_equal(second[1], fresh[0])


def test_any_codebook_prefix_decodes(model: Mimi, offline):
    codes, _ = offline
    audio = jax.jit(lambda c: model.decode(c))(codes[:, :2])
    assert audio.shape == (2, FRAMES * TINY.frame_size) and bool(jnp.isfinite(audio).all())


def test_training_pass_updates_codebooks_and_gradients(wav: jax.Array):
    model = Mimi(TINY, rngs=nnx.Rngs(3))
    before = np.asarray(model.quantizer.rvq_rest.layers[0].embedding_sum[...])

    def loss_fn(m: Mimi) -> tuple[jax.Array, jax.Array]:
        recon, q = m(wav, jax.random.key(0))
        return jnp.mean(jnp.square(recon - wav)) + q.commit_loss, q.codes_bkt

    (loss, codes), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    assert bool(jnp.isfinite(loss)) and codes.shape == (2, TINY.n_q, FRAMES)
    after = np.asarray(model.quantizer.rvq_rest.layers[0].embedding_sum[...])
    assert not np.allclose(before, after), "EMA update must change the codebook"
    assert float(model.quantizer.rvq_rest.layers[0].initialized[...][0]) == 1.0
    enc_grad = grads["encoder"]["stages"][0]["kernel"][...]
    assert float(jnp.abs(enc_grad).sum()) > 0, "gradients reach the encoder through the quantizer"
    assert not any(
        isinstance(v, nnx.Variable) and "embedding_sum" in str(p)
        for p, v in nnx.to_flat_state(grads)
    )


def test_quantizer_dropout_limits_codebooks(wav: jax.Array):
    cfg = CodecConfig(
        **{
            **TINY.__dict__,
            "quantizer": QuantizerConfig(dimension=16, total_codebooks=4, bins=64, q_dropout=True),
        }
    )
    model = Mimi(cfg, rngs=nnx.Rngs(0))
    latent = model.encode_latent(wav)
    full = model.quantizer.train_forward(latent, 4, jax.random.key(0))
    assert full.codes_bkt.shape[1] == 4 and bool(jnp.isfinite(full.commit_loss))


def test_sharded_forward_equals_single_device(model: Mimi, wav: jax.Array, offline):
    """Params sharded by the logical rules on a (data, fsdp, tensor) = (2, 2, 2) mesh."""
    if jax.device_count() < 8:
        pytest.fail("tests need 8 simulated devices (tests/conftest.py sets XLA_FLAGS)")
    mesh = build_mesh(MeshConfig(ici_data=2, ici_fsdp=2, ici_tensor=2))
    sharded = shard_model(model, mesh, DEFAULT_RULES)
    specs = {
        str(v.sharding.spec)
        for _, v in nnx.to_flat_state(nnx.state(sharded))
        if hasattr(v[...], "sharding")
    }
    assert any("tensor" in s for s in specs), specs
    with jax.set_mesh(mesh):
        codes = jax.jit(lambda m, w: m.encode(w))(sharded, wav)
        audio = jax.jit(lambda m, c: m.decode(c))(sharded, codes)
    np.testing.assert_array_equal(codes, offline[0])
    np.testing.assert_allclose(audio, offline[1], atol=1e-5)


def test_full_mimi_parameter_count():
    abstract = nnx.eval_shape(lambda: Mimi(CodecConfig(), rngs=nnx.Rngs(0)))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n_params == 79_308_609  # Kyutai's Mimi: 79.3 M trainable parameters


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="codec.n_q"):
        CodecConfig(n_q=40)
    with pytest.raises(ValueError, match="codec.frame_rate"):
        CodecConfig(frame_rate=7.0)
