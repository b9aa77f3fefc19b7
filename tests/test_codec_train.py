"""Codec training: discriminators and losses, the one-backward-pass trick, EMA codebooks in
checkpoints, a short run that learns, and distillation from the mel teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from flax import nnx
from test_codec_metrics import reference_mel_distance, stft_magnitude

from sfm.codec import losses as L
from sfm.codec.config import DiscConfig
from sfm.codec.discriminator import MultiDiscriminator
from sfm.codec.mel import stft
from sfm.config import Config, load_config
from sfm.eval.codec_metrics import mel_distance
from sfm.io.codec import build_codec, load_run_config
from sfm.parallel.mesh import build_mesh
from sfm.train import checkpoint as ckpt
from sfm.train.codec_task import CodecTask, build_dataset, codec_losses, corpus_clips
from sfm.train.step import make_optimizer, split_model

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "train" / "tiny_codec.yaml"
SR = 24000
# A cheaper discriminator for the run; an even smaller codec for the gradient checks.
FAST = [
    "codec_train.disc.filters=4",
    "codec_train.disc.n_ffts=[512,128]",
    "codec_train.disc.dilations=[1]",
]
SMALL = [
    *FAST,
    "codec.seanet.ratios=[8,6,5]",
    "codec.transformer.num_layers=1",
    "codec.quantizer.total_codebooks=2",
    "codec.n_q=2",
    "codec_train.mel_scales=[[256,32]]",
    "codec_train.teacher=mel",
]
STEPS = 30


def _tones(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A gliding harmonic tone with a slow envelope and a little noise: no silence."""
    t = np.arange(int(SR * seconds)) / SR
    f0 = rng.uniform(100, 250) * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.2, 1) * t))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    x = sum(np.sin(h * phase) / h for h in range(1, 6)) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * t))
    return (0.2 * x + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 s of tones in moshi-finetune layout (a bad manifest line at the end); the first
    file is stereo."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "wav").mkdir()
    rng, lines = np.random.default_rng(0), []
    for i in range(4):
        chans = [_tones(5.0, rng) for _ in range(2 if i == 0 else 1)]
        sf.write(root / f"wav/{i}.wav", np.stack(chans, 1), SR)
        words = {"alignments": [["la", [0.1, 0.5], "SPEAKER_MAIN"]]}  # for tfds preparation
        (root / f"wav/{i}.json").write_text(json.dumps(words))
        lines.append(json.dumps({"path": f"wav/{i}.wav", "duration": 5.0}))
    (root / "manifest.jsonl").write_text("\n".join([*lines, "not json"]) + "\n")
    return root


@pytest.fixture(scope="module", autouse=True)
def launched(corpus: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A 30-step `sfm train` on one device (quicker to compile and checkpoint than the eight
    simulated here), started first so that it runs beside the other tests; log_every 3
    makes the loop log audio samples at step 30."""
    out = tmp_path_factory.mktemp("run")
    overrides = [*FAST, f"codec_train.corpus=[{corpus}]", f"train.out_dir={out}"]
    overrides += [f"train.steps={STEPS}", "train.ckpt_every=10", "train.log_every=3"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    cmd = [sys.executable, "-m", "sfm.train", str(PRESET), *overrides]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    yield proc, load_config(PRESET, overrides), out
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def run(launched) -> tuple[Config, Path]:  # noqa: ANN001
    """The finished run's config and output directory."""
    proc, cfg, out = launched
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    return cfg, out


def test_crops_from_wav_and_tfds_corpora_are_deterministic(corpus: Path, tmp_path: Path) -> None:
    from sfm.data.tfds_speech import prepare

    prepare(corpus, tmp_path / "tfds", validation_fraction=0.0)  # mono only: 3 of 4 files
    clips, sources = corpus_clips((str(corpus), str(tmp_path / "tfds")), "train")
    assert [c[0] for c in clips].count("wav") == 4 and len(sources) == 1
    cfg = load_config(PRESET, [f"codec_train.corpus=[{corpus},{tmp_path / 'tfds'}]"])
    first = [next(iter(build_dataset(cfg)))["wav"] for _ in range(2)]
    assert first[0].shape == (cfg.data.batch_size, 6000) and first[0].dtype == np.float32
    np.testing.assert_array_equal(first[0], first[1])
    assert (np.abs(first[0]).max(axis=1) > 0.05).all() and np.abs(first[0]).max() <= 1.0


# ---- (a) discriminators and losses -----------------------------------------------------


def test_stft_matches_numpy() -> None:
    x = np.random.default_rng(0).standard_normal(3000).astype(np.float32)
    ours = np.abs(np.asarray(stft(jnp.asarray(x[None]), 256, 64)[0]))
    np.testing.assert_allclose(ours, stft_magnitude(x.astype(np.float64), 256, 64), atol=1e-3)


def test_discriminator_shapes() -> None:
    cfg = DiscConfig(n_ffts=(256,), filters=4, dilations=(1, 2), periods=(2,), period_filters=4)
    disc = MultiDiscriminator(cfg, rngs=nnx.Rngs(0))
    logits, feats = disc(jnp.zeros((2, 4800)))
    frames, bins = 1 + (4800 - 256) // 64, 129
    assert logits[0].shape == (2, frames, -(-bins // 4), 1)  # two frequency strides of 2
    assert [f.shape[-1] for f in feats[0]] == [4, 4, 4, 4, 1]
    assert logits[1].shape == (2, 2400 // 27 + 1, 2, 1)  # three time strides of 3
    assert len(feats[1]) == 5


def test_mel_loss_zero_for_identical_and_matches_the_metric() -> None:
    rng = np.random.default_rng(1)
    real = _tones(0.5, rng)[None]
    fake = real + 0.05 * rng.standard_normal(real.shape).astype(np.float32)
    assert float(L.mel_loss(jnp.asarray(real), jnp.asarray(real), SR)) == 0.0
    ours = float(L.mel_loss(jnp.asarray(real), jnp.asarray(fake), SR))
    assert ours > 0.05
    assert ours == pytest.approx(reference_mel_distance(real[0], fake[0], SR), rel=1e-3)
    assert ours == pytest.approx(mel_distance(real[0], fake[0], SR), rel=1e-5)


def test_hinge_feature_matching_and_accuracy_on_known_values() -> None:
    real, fake = [jnp.array([2.0, 0.5, -1.0])], [jnp.array([-2.0, 0.0, 1.0])]
    assert float(L.hinge_disc_loss(real, fake)) == pytest.approx(2.5 / 3 + 1.0)
    assert float(L.hinge_gen_loss(fake)) == pytest.approx(4 / 3)
    assert float(L.disc_accuracy(real, fake)) == pytest.approx(0.5)
    feats = [[jnp.full((2, 3), 2.0), jnp.full((4,), -1.0)]]
    assert float(L.feature_matching_loss(feats, feats)) == 0.0
    half = [[jnp.full((2, 3), 1.0), jnp.full((4,), -1.0)]]
    assert float(L.feature_matching_loss(feats, half)) == pytest.approx(0.25)


def test_distill_loss_resamples_the_teacher() -> None:
    student = jax.random.normal(jax.random.key(0), (2, 5, 8))
    teacher = jnp.repeat(student, 4, axis=1)  # same features at 4x the frame rate
    assert float(L.distill_loss(student, teacher)) == pytest.approx(0.0, abs=1e-5)
    assert float(L.distill_loss(student, -teacher)) == pytest.approx(2.0, abs=1e-5)
    feats = L.MelTeacher(SR, dim=16)(jnp.ones((2, 4800)))
    assert feats.shape == (2, 4800 // 480 + 1, 16)


# ---- (b) one backward pass, (e) distillation -------------------------------------------


def _flat(state: nnx.State, disc: bool) -> np.ndarray:
    leaves = [v for p, v in nnx.to_flat_state(state) if (p[0] == "disc") == disc]
    return np.concatenate([np.ravel(np.asarray(v.get_value())) for v in leaves])


@pytest.fixture(scope="module")
def jacobian():  # noqa: ANN201
    """Gradients of [L_gen, L_disc] one-pass, [L_gen, L_disc] plain, and L_distill, from one
    compile. Each row starts from the same model and EMA state."""
    cfg = load_config(PRESET, SMALL)
    model = CodecTask().build_model(cfg)
    teacher = L.make_teacher("mel", SR, cfg.codec_train.teacher_dim)
    wav = jnp.asarray(np.stack([_tones(0.25, np.random.default_rng(i)) for i in range(2)]))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def rows(params: nnx.State) -> tuple[jax.Array, jax.Array]:
        out = []
        for one_pass in (True, False):
            m = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
            gen, disc, metrics = codec_losses(m, wav, jax.random.key(0), cfg, teacher, one_pass)
            out += [gen, disc]
        vec = jnp.stack([*out, metrics["distill"]])
        return vec, vec

    jac, values = jax.jit(jax.jacrev(rows, has_aux=True))(params)
    return np.asarray(values), jax.device_get(jac)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.max(np.abs(a - b))) <= 1e-4 * float(np.max(np.abs(b))) + 1e-7


def test_one_backward_pass_trains_each_player_on_its_own_loss(jacobian) -> None:  # noqa: ANN001
    _, jac = jacobian
    row = lambda i: jax.tree.map(lambda x: x[i], jac)  # noqa: E731
    total = jax.tree.map(np.add, row(0), row(1))
    gen_plain, disc_plain = row(2), row(3)
    assert _close(_flat(total, disc=False), _flat(gen_plain, disc=False))
    assert _close(_flat(total, disc=True), _flat(disc_plain, disc=True))
    # Not vacuous: each plain loss does push the other player.
    assert np.abs(_flat(gen_plain, disc=True)).max() > 1e-6
    assert np.abs(_flat(disc_plain, disc=False)).max() > 1e-6


def test_distillation_is_finite_and_reaches_the_encoder(jacobian) -> None:  # noqa: ANN001
    values, jac = jacobian
    assert np.isfinite(np.asarray(values)).all() and 0.0 < float(values[4]) < 2.0
    grads = jax.tree.map(lambda x: x[4], jac)
    encoder = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(grads["codec"]["encoder"])]
    assert all(np.isfinite(g).all() for g in encoder)
    assert max(np.abs(g).max() for g in encoder) > 1e-8
    assert np.abs(_flat(grads, disc=True)).max() == 0.0


# ---- (c) EMA codebooks in checkpoints, (d) a short run ----------------------------------


def test_run_lowers_the_mel_loss_and_exports_a_loadable_codec(run) -> None:  # noqa: ANN001
    cfg, out = run
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    mel = [r["mel"] for r in rows]
    assert {"adv", "feat", "mel", "commit", "disc", "disc_acc", "gen"} <= set(rows[0])
    first, last = np.mean(mel[:5]), np.mean(mel[-5:])
    print(f"mel loss: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last < 0.6 * first, (first, last)
    path = out / "codec.safetensors"
    stored = load_run_config(None, path, [])
    assert stored.codec == cfg.codec and stored.train.task == "codec"
    trained = dict(nnx.to_flat_state(nnx.state(build_codec(stored, path))))
    initial = dict(nnx.to_flat_state(nnx.state(build_codec(stored))))
    for key in (
        ("encoder", "stages", 0, "kernel"),
        ("quantizer", "rvq_rest", "layers", 0, "embedding_sum"),
    ):
        assert key in trained and not np.allclose(
            trained[key].get_value(), initial[key].get_value()
        )
    events = next((out / "tensorboard").glob("events.*")).read_bytes()
    assert b"samples/reconstructed" in events and b"spectrogram/real" in events


def test_ema_codebooks_and_data_position_are_checkpointed(run) -> None:  # noqa: ANN001
    cfg, out = run
    task = CodecTask()
    tx = make_optimizer(cfg.train.optim, cfg.train.steps)
    parts = split_model(
        task.build_model(cfg),
        nnx.Param,
        tx,
        build_mesh(cfg.mesh),
        cfg.mesh.rules,
        task.mutable(cfg),
    )
    state = {
        "params": parts.params,
        "mutable": parts.mutable,
        "frozen": parts.frozen,
        "opt_state": parts.opt_state,
    }
    iterator = iter(task.dataset(cfg))
    mgr = ckpt.manager(out / "checkpoints", 10, 3, False)
    step, restored = ckpt.restore_latest(mgr, state, iterator)
    mgr.close()
    assert step == STEPS
    initial = dict(nnx.to_flat_state(parts.mutable))
    exported = dict(nnx.to_flat_state(nnx.state(build_codec(cfg, out / "codec.safetensors"))))
    for path, var in nnx.to_flat_state(restored["mutable"]):
        assert path[0] == "codec"
        np.testing.assert_array_equal(var.get_value(), exported[path[1:]].get_value())
        if path[-1] == "embedding_sum":
            assert not np.allclose(var.get_value(), initial[path].get_value())
    fresh = iter(task.dataset(cfg))
    for _ in range(STEPS):
        next(fresh)
    np.testing.assert_array_equal(next(iterator)["wav"], next(fresh)["wav"])


def test_log_samples_writes_audio_and_spectrograms(run) -> None:  # noqa: ANN001
    cfg, out = run
    calls: list[tuple] = []
    writer = types.SimpleNamespace(
        add_audio=lambda *a, **k: calls.append(("audio", a, k)),
        add_image=lambda *a, **k: calls.append(("image", a, k)),
    )
    model = types.SimpleNamespace(codec=build_codec(cfg, out / "codec.safetensors"))
    wav = np.stack([_tones(0.5, np.random.default_rng(i)) for i in range(2)])
    CodecTask().log_samples(writer, 7, model, {"wav": jnp.asarray(wav)})
    audio = [c for c in calls if c[0] == "audio"]
    images = [c for c in calls if c[0] == "image"]
    assert len(audio) == 2 and len(images) == 2
    assert audio[0][1][1].shape == (wav.shape[1],) and np.isfinite(audio[1][1][1]).all()
    assert images[0][1][1].ndim == 3 and images[0][1][1].shape[-1] == 3
