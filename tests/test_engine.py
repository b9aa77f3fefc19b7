"""The batched engine: a slot equals the streaming codec and the Generator run by hand, slots
do not hear each other, a rejoined slot is a fresh session, long sessions stay bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfm.cli import main
from sfm.codec.model import Mimi
from sfm.codec.streaming import StreamingCodec
from sfm.config import dump_yaml, load_config, resolve_preset
from sfm.infer.converse import load_models
from sfm.infer.engine import Engine, SessionSampling
from sfm.infer.quantize import (
    Int8Weight,
    dequantize,
    quantize_int8,
    serving_leaves,
    weight_bytes,
)
from sfm.infer.stablehlo import export_stablehlo
from sfm.io.export import export, verify_export
from sfm.io.params import save_params
from sfm.io.tensors import CheckpointError
from sfm.lm.generate import Generator, SamplingConfig
from sfm.lm.model import LM
from sfm.testing.audio import gliding_tone

SLOTS = 3
FRAMES = 12
SAMPLED = SamplingConfig(temp=1.0, top_k=0, temp_text=1.0, top_k_text=0)


@pytest.fixture(scope="module")
def models() -> tuple[Mimi, LM]:
    """The tiny codec and LM; the codec's codebooks start from speech latents (one training
    pass), so that different audio gets different codes (random codebooks give one code)."""
    cfg = load_config(resolve_preset("tiny", "lm"))
    codec = Mimi(cfg.codec, rngs=nnx.Rngs(0))
    wav = np.concatenate([_speech(40, cfg.codec.frame_size, s).reshape(1, -1) for s in range(4)])
    codec(jnp.asarray(wav), jax.random.key(0))
    return codec, LM(cfg.lm, rngs=nnx.Rngs(1))


def _speech(frames: int, frame_size: int, seed: int) -> np.ndarray:
    """[frames, frame_size] of a gliding tone with noise: audio that moves the codes."""
    wav = gliding_tone(frames * frame_size, np.random.default_rng(seed))
    return wav.reshape(frames, frame_size)


def _run(engine: Engine, inputs: dict[int, np.ndarray], frames: int) -> list:
    return [engine.step({s: x[t] for s, x in inputs.items()}) for t in range(frames)]


def _served(lm: LM, weights: str) -> LM:
    """The LM with the weights the engine serves, dequantized to float32."""
    graphdef, params = nnx.split(lm)
    leaves = dequantize(serving_leaves(lm, weights), jnp.float32)  # type: ignore[arg-type]
    return nnx.merge(graphdef, jax.tree.unflatten(jax.tree.structure(params), leaves))


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_one_slot_equals_codec_and_generator_by_hand(models: tuple[Mimi, LM], weights: str) -> None:
    codec, lm = models
    greedy = SamplingConfig(greedy=True)
    engine = Engine(codec, lm, SLOTS, greedy, weights=weights)  # type: ignore[arg-type]
    lm = _served(lm, weights)
    key = jax.random.key(7)
    others = [engine.join(jax.random.key(i)) for i in range(2)]
    slot = engine.join(key)
    user = _speech(FRAMES, engine.frame_size, 0)
    noise = {s: _speech(FRAMES, engine.frame_size, 10 + s) for s in others}
    frames = _run(engine, {slot: user, **noise}, FRAMES)

    encoder, decoder = StreamingCodec(codec, 1, lm.cfg.n_q), StreamingCodec(codec, 1)
    gen = Generator(lm, greedy)
    state = gen.init(1, key[None])
    for t in range(FRAMES):
        codes = encoder.encode_chunk(user[t][None])
        state, tokens, valid = gen.step(state, codes[:, :, 0])
        out = frames[t]
        assert bool(valid[0]) == bool(out.valid[slot])
        assert int(tokens[0, 0]) == int(out.text[slot])
        np.testing.assert_array_equal(np.asarray(tokens[0, 1:]), out.codes[slot])
        if bool(valid[0]):
            audio = np.asarray(decoder.decode_chunk(tokens[:, 1:, None]))[0]
            np.testing.assert_allclose(out.audio[slot], audio, rtol=0, atol=1e-5)
        else:
            assert not out.audio[slot].any()
    assert sum(f.valid[slot] for f in frames) == FRAMES - lm.cfg.max_delay
    assert np.abs(np.stack([f.audio[slot] for f in frames])).max() > 0


def test_a_session_does_not_hear_its_neighbours(models: tuple[Mimi, LM]) -> None:
    codec, lm = models
    outputs = []
    for neighbours_seed in (1, 2):
        engine = Engine(codec, lm, SLOTS, SAMPLED)
        slot = engine.join(jax.random.key(3))
        others = [engine.join() for _ in range(SLOTS - 1)]
        user = _speech(FRAMES, engine.frame_size, 0)
        noise = {s: _speech(FRAMES, engine.frame_size, 100 * neighbours_seed + s) for s in others}
        frames = _run(engine, {slot: user, **noise}, FRAMES)
        outputs.append(frames)
    a, b = outputs
    assert slot == 0
    for fa, fb in zip(a, b, strict=True):
        assert int(fa.text[slot]) == int(fb.text[slot])
        np.testing.assert_array_equal(fa.codes[slot], fb.codes[slot])
        np.testing.assert_allclose(fa.audio[slot], fb.audio[slot], rtol=0, atol=1e-6)
    for slot in range(1, SLOTS):  # the neighbours did hear (and say) different things
        assert not np.array_equal(*(np.stack([f.codes[slot] for f in x]) for x in (a, b)))


def test_leave_and_join_is_a_fresh_session(models: tuple[Mimi, LM]) -> None:
    codec, lm = models
    used = Engine(codec, lm, SLOTS, SAMPLED)
    first = used.join(jax.random.key(1))
    _run(used, {first: _speech(5, used.frame_size, 4)}, 5)
    used.leave(first)
    assert used.join(jax.random.key(2)) == first
    new = Engine(codec, lm, SLOTS, SAMPLED)
    assert new.join(jax.random.key(2)) == first
    user = _speech(FRAMES, used.frame_size, 5)
    for fa, fb in zip(
        _run(used, {first: user}, FRAMES), _run(new, {first: user}, FRAMES), strict=True
    ):
        assert int(fa.text[first]) == int(fb.text[first])
        np.testing.assert_array_equal(fa.codes[first], fb.codes[first])
        np.testing.assert_allclose(fa.audio[first], fb.audio[first], rtol=0, atol=1e-6)


def test_session_ten_times_the_context_stays_finite_and_bounded(models: tuple[Mimi, LM]) -> None:
    codec, lm = models
    engine = Engine(codec, lm, 2, SAMPLED)
    slot = engine.join()
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), engine._state)
    frames = 10 * max(lm.cfg.temporal.context, codec.cfg.transformer.context)
    user = _speech(frames, engine.frame_size, 6)
    peak = 0.0
    for t in range(frames):
        out = engine.step({slot: user[t]})
        assert np.isfinite(out.audio).all()
        peak = max(peak, float(np.abs(out.audio[slot]).max()))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), engine._state) == shapes
    assert int(engine._state.gen.offset[slot]) == frames
    assert peak > 0
    lat = engine.latency_ms()
    assert lat["frames"] == frames and 0 < lat["p50"] <= lat["p95"] <= lat["p99"]


def test_slot_errors(models: tuple[Mimi, LM]) -> None:
    codec, lm = models
    engine = Engine(codec, lm, 1, SAMPLED)
    slot = engine.join()
    with pytest.raises(RuntimeError, match="all 1 slots are busy"):
        engine.join()
    with pytest.raises(ValueError, match="slot 3 out of range"):
        engine.leave(3)
    with pytest.raises(ValueError, match=r"user audio \(1, 7\)"):
        engine.step(jnp.zeros((1, 7)))
    engine.leave(slot)
    with pytest.raises(ValueError, match="slot 0 holds no session"):
        engine.step({0: np.zeros(engine.frame_size)})


def test_cli_infer_writes_the_conversation_and_the_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sfm infer --config tiny`: random tiny weights; the user is the right channel, the left
    is what the engine says (checked against a second engine run by hand), the text has
    times."""
    import soundfile as sf

    from sfm.lm.layout import TEXT_EPAD, TEXT_PAD

    cfg = load_config(resolve_preset("tiny", "lm"))
    user = _speech(30, cfg.codec.frame_size, 8).reshape(-1)[:-100]  # not whole frames
    sf.write(tmp_path / "user.wav", user, cfg.codec.sample_rate, subtype="FLOAT")
    out = tmp_path / "talk.wav"
    argv = ["infer", "--config", "tiny", "--wav", str(tmp_path / "user.wav"), "--out", str(out)]
    assert main([*argv, "--greedy"]) == 0
    assert "real-time factor" in capsys.readouterr().out
    stereo, rate = sf.read(out, dtype="float32")
    assert rate == cfg.codec.sample_rate and stereo.shape == (30 * cfg.codec.frame_size, 2)
    np.testing.assert_array_equal(stereo[: len(user), 1], user)

    codec, lm, _ = load_models(config="tiny")
    engine = Engine(codec, lm, 1, SamplingConfig(greedy=True))
    slot = engine.join()
    frames = _run(engine, {slot: stereo[:, 1].reshape(30, -1)}, 30)
    np.testing.assert_allclose(
        stereo[:, 0], np.concatenate([f.audio[slot] for f in frames]), atol=1e-5
    )
    text = json.loads(out.with_suffix(".json").read_text())["text"]
    want = [
        (t * cfg.codec.frame_size / rate, int(f.text[slot]))
        for t, f in enumerate(frames)
        if f.valid[slot] and int(f.text[slot]) not in (TEXT_PAD, TEXT_EPAD)
    ]
    assert [(w["time_s"], w["token"]) for w in text] == [(round(t, 3), i) for t, i in want]


def test_int8_is_symmetric_per_output_channel_on_a_hand_built_kernel() -> None:
    w = jnp.asarray([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-0.254, 0.127, 0.0]])
    q = quantize_int8(w)
    np.testing.assert_allclose(np.asarray(q.scale)[:, 0], [1 / 127, 1.0, 0.002], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.q), [[127, -64, 32], [0, 0, 0], [-127, 64, 0]])
    err = np.abs(np.asarray(q.dequantize(jnp.float32)) - np.asarray(w))
    assert (err <= np.asarray(q.scale) / 2 + 1e-7).all()


@pytest.mark.parametrize(("weights", "bound"), [("bfloat16", 1e-2), ("int8", 2e-2)])
def test_served_weights_error_against_float32(
    models: tuple[Mimi, LM], weights: str, bound: float
) -> None:
    """Relative RMS error of the logits of the LM as served against float32 (teacher-forced,
    random tokens): the half-step rounding of bf16 (2^-9) and per-channel int8 (1/254 of a
    channel's largest weight) keeps it well under a percent or two."""
    _, lm = models
    served = _served(lm, weights)
    tokens = jax.random.randint(jax.random.key(3), (2, lm.cfg.n_streams, 24), 0, lm.cfg.card)
    ref, out = lm(tokens), served(tokens)
    for a, b in ((ref.text_logits, out.text_logits), (ref.audio_logits, out.audio_logits)):
        rel = float(jnp.sqrt(jnp.mean((a - b) ** 2) / jnp.mean(a**2)))
        print(f"{weights}: relative RMS logit error {rel:.2e}")
        assert 0 < rel < bound
    leaves = serving_leaves(lm, weights)  # type: ignore[arg-type]
    f32, bf16 = (weight_bytes(serving_leaves(lm, w)) for w in ("float32", "bfloat16"))
    print(f"{weights}: {weight_bytes(leaves)} bytes of weights, {weight_bytes(leaves) / f32:.2f}")
    assert bf16 == f32 // 2
    if weights == "int8":
        assert weight_bytes(leaves) < 0.7 * bf16
        paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(nnx.split(lm)[1])[0]]
        kernels = [x for p, x in zip(paths, leaves, strict=True) if "kernel" in str(p)]
        assert len(kernels) == 11 and all(isinstance(x, Int8Weight) for x in kernels)
        assert all(x.scale.shape == (*x.shape[:-1], 1) for x in kernels)


# Runs an export with JAX and safetensors only: init 2 slots, FRAMES frames, then reset slot
# 0 (same key) and FRAMES more; fails if anything of sfm was imported.
_EXPORT_READER = """
import json, sys
import jax, numpy as np
from safetensors.flax import load_file
folder, inputs, result = sys.argv[1:]
serving = json.load(open(f"{folder}/serving.json"))
tensors = load_file(f"{folder}/weights.safetensors")
weights = [tensors[name] for name in serving["weights"]]
fn = {k: jax.export.deserialize(open(f"{folder}/{v}", "rb").read())
      for k, v in serving["functions"].items()}
step = jax.jit(fn["step"].call, donate_argnums=1)
x = np.load(inputs)
state = fn["init"].call(weights, x["key_data"])
out = {k: [] for k in ("tokens", "audio", "valid", "again")}
for wav in x["wav_tbf"]:
    state, *frame = step(weights, state, wav)
    for k, v in zip(out, frame):
        out[k].append(np.asarray(v))
state = fn["reset"].call(weights, state, np.array([True, False]), x["key_data"])
for wav in x["wav_tbf"]:
    state, tokens, *_ = step(weights, state, wav)
    out["again"].append(np.asarray(tokens))
assert not [m for m in sys.modules if m == "sfm" or m.startswith("sfm.")]
np.savez(result, **{k: np.stack(v) for k, v in out.items()})
"""


def _tokens(frames: list) -> np.ndarray:
    """[T, slots, 1 + dep_q]: text and audio tokens of every frame."""
    return np.stack([np.concatenate([f.text[:, None], f.codes], axis=1) for f in frames])


def test_stablehlo_export_runs_without_sfm_and_equals_the_engine(
    models: tuple[Mimi, LM], tmp_path: Path
) -> None:
    """int8 weights, sampled tokens (per-slot keys) with the run's own sampling: the export run
    by JAX alone equals the engine frame for frame, before and after slot 0 is reset (slot 1
    carries on)."""
    codec, lm = models
    cfg = load_config(resolve_preset("tiny", "lm"))
    run = tmp_path / "run"
    save_params(lm, run / "lm.safetensors", dump_yaml(cfg))
    save_params(codec, run / "codec.safetensors", dump_yaml(cfg))
    out = tmp_path / "export"
    assert main(["export", str(run), str(out), "--format", "stablehlo", "--weights", "int8"]) == 0
    assert verify_export(out)["format"] == "stablehlo"
    serving = json.loads((out / "serving.json").read_text())
    assert serving["platforms"] == ["cpu", "cuda", "tpu"] and serving["weight_format"] == "int8"

    keys = [jax.random.key(5), jax.random.key(6)]
    wav_tbf = np.stack([_speech(FRAMES, cfg.codec.frame_size, s) for s in (0, 1)], axis=1)
    np.savez(tmp_path / "in.npz", wav_tbf=wav_tbf, key_data=jax.random.key_data(jnp.stack(keys)))
    reader = [sys.executable, "-c", _EXPORT_READER, str(out), str(tmp_path / "in.npz")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([*reader, str(tmp_path / "res.npz")], check=True, env=env)
    got = np.load(tmp_path / "res.npz")

    engine = Engine(codec, lm, 2, cfg.sampling, weights="int8")  # the run's own, as exported
    assert cfg.sampling.top_k == 32 and [engine.join(k) for k in keys] == [0, 1]
    frames = [engine.step(wav_tbf[t]) for t in range(FRAMES)]
    engine.reset(0, keys[0])
    again = [engine.step(wav_tbf[t]) for t in range(FRAMES)]
    np.testing.assert_array_equal(got["tokens"], _tokens(frames))
    np.testing.assert_array_equal(got["valid"], np.stack([f.valid for f in frames]))
    np.testing.assert_allclose(got["audio"], np.stack([f.audio for f in frames]), atol=1e-5)
    np.testing.assert_array_equal(got["again"], _tokens(again))
    np.testing.assert_array_equal(got["again"][:, 0], got["tokens"][:, 0])  # a fresh session
    assert not np.array_equal(got["again"][:, 1], got["tokens"][:, 1])  # slot 1 went on
    assert np.abs(got["audio"]).max() > 0

    with (out / "step.jaxexport").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="step.jaxexport: changed since export"):
        verify_export(out)
    lm_only = tmp_path / "lm_only"
    save_params(lm, lm_only / "lm.safetensors", dump_yaml(cfg))
    with pytest.raises(CheckpointError, match="no codec weights .*: give --codec"):
        export_stablehlo(lm_only, tmp_path / "never")


def test_stablehlo_export_of_a_kernel_run_lowers_the_references(
    models: tuple[Mimi, LM], tmp_path: Path
) -> None:
    """A run trained with lm.attention_impl=pallas exports for cpu, cuda and tpu at once
    (a Pallas kernel lowers for its own platform only): its step carries no kernel."""
    codec, lm = models
    cfg = load_config(resolve_preset("tiny", "lm"), ["lm.attention_impl=pallas"])
    run = tmp_path / "run"
    save_params(lm, run / "lm.safetensors", dump_yaml(cfg))
    save_params(codec, run / "codec.safetensors", dump_yaml(cfg))
    export_stablehlo(run, tmp_path / "export")
    step = jax.export.deserialize(bytearray((tmp_path / "export" / "step.jaxexport").read_bytes()))
    assert step.platforms == ("cpu", "cuda", "tpu")
    text = step.mlir_module()
    assert "tpu_custom_call" not in text and "mosaic_gpu" not in text


def test_engine_from_kyutai_files_and_an_sfm_export_equals_the_run(
    models: tuple[Mimi, LM], tmp_path: Path
) -> None:
    """One run served three ways: from its own weights, from its moshi export (Kyutai's
    model.safetensors + mimi.safetensors, as Kyutai's releases) and from its sfm export; the
    same user audio gives the same tokens and audio (greedy)."""
    codec, _ = models
    cfg = load_config(resolve_preset("tiny", "lm"), ["lm.depth.dim_feedforward=96"])
    lm = LM(cfg.lm, rngs=nnx.Rngs(2))  # a depformer width moshi has
    run = tmp_path / "run"
    save_params(lm, run / "lm.safetensors", dump_yaml(cfg))
    save_params(codec, run / "codec.safetensors", dump_yaml(cfg))
    (tmp_path / "lm.yaml").write_text(dump_yaml(cfg))
    export(run, tmp_path / "moshi", "moshi")
    export(run, tmp_path / "sfm", "sfm")
    sources = {
        "run": load_models(run, codec_checkpoint=run / "codec.safetensors"),
        "kyutai": load_models(
            tmp_path / "moshi" / "model.safetensors",
            config=str(tmp_path / "lm.yaml"),
            codec_checkpoint=tmp_path / "moshi" / "mimi.safetensors",
        ),
        "sfm export": load_models(tmp_path / "sfm", codec_checkpoint=tmp_path / "sfm"),
    }
    user = _speech(FRAMES, cfg.codec.frame_size, 3)
    outputs = {}
    for name, (c, m, _) in sources.items():
        engine = Engine(c, m, 1, SamplingConfig(greedy=True))
        outputs[name] = _run(engine, {engine.join(jax.random.key(0)): user}, FRAMES)
    ref = outputs.pop("run")
    assert sum(f.valid[0] for f in ref) == FRAMES - cfg.lm.max_delay
    for name, frames in outputs.items():
        for got, want in zip(frames, ref, strict=True):
            np.testing.assert_array_equal(got.codes, want.codes, err_msg=name)
            np.testing.assert_array_equal(got.text, want.text, err_msg=name)
            np.testing.assert_allclose(got.audio, want.audio, atol=1e-5, err_msg=name)


def test_each_session_samples_with_its_own_settings(models: tuple[Mimi, LM]) -> None:
    """In a sampling engine, a session at temperature 0 and one at top-k 1 say what a greedy
    engine says; a neighbour at the engine's settings does not."""
    codec, lm = models
    user = _speech(FRAMES, codec.cfg.frame_size, 6)
    greedy = Engine(codec, lm, SLOTS, SamplingConfig(greedy=True))
    slot = greedy.join(jax.random.key(1))
    want = _tokens(_run(greedy, {slot: user}, FRAMES))[:, slot]

    engine = Engine(codec, lm, SLOTS, SAMPLED)
    cold = engine.join(jax.random.key(1), SessionSampling(temp=0.0, temp_text=0.0))
    top1 = engine.join(jax.random.key(2), SessionSampling(top_k=1, top_k_text=1))
    warm = engine.join(jax.random.key(3))
    got = _tokens(_run(engine, {cold: user, top1: user, warm: user}, FRAMES))
    np.testing.assert_array_equal(got[:, cold], want)
    assert not np.array_equal(got[:, warm], want)
    # SAMPLED has no top-k cap (0: the full distribution), so a top-k of 1 is not applied
    assert not np.array_equal(got[:, top1], want)
    capped = Engine(codec, lm, SLOTS, SamplingConfig(top_k=8, top_k_text=8))
    one = capped.join(jax.random.key(2), SessionSampling(top_k=1, top_k_text=1))
    np.testing.assert_array_equal(_tokens(_run(capped, {one: user}, FRAMES))[:, one], want)
    with pytest.raises(ValueError, match="temp: must be a finite number >= 0, got -1"):
        engine.reset(cold, sampling=SessionSampling(temp=-1.0))
