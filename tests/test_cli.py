"""Tests for the `sfm` command line: happy paths on the tiny codec, one-line errors otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

from sfm.cli import CACHE_ENV, main
from sfm.codec.files import CHUNK_FRAMES, decode_codes, encode_wav, streaming_codec
from sfm.config import dump_yaml
from sfm.data.text import sentences
from sfm.io.codec import build_codec, load_run_config
from sfm.io.mimi import export_mimi
from sfm.io.params import save_params

REPO = Path(__file__).resolve().parent.parent
TINY = ["--config", "tiny"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A compile cache shared by the in-process runs and the subprocess; JAX restored after."""
    path = tmp_path_factory.mktemp("jax_cache")
    saved = {
        k: getattr(jax.config, k)
        for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(path))
        jax.config.update("jax_compilation_cache_dir", None)
        yield path
    for key, value in saved.items():
        jax.config.update(key, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A folder with a 1 s sine + noise WAV at 16 kHz (so loading also resamples)."""
    path = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    wav = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.02 * rng.standard_normal(t.size)
    sf.write(path / "in.wav", wav.astype(np.float32), 16000)
    return path


@pytest.fixture(scope="module")
def encoded(work: Path) -> Path:
    """`sfm codec encode` of the test WAV with the tiny codec."""
    assert main(["codec", "encode", str(work / "in.wav"), str(work / "codes.npz"), *TINY]) == 0
    return work / "codes.npz"


def _run_error(capsys: pytest.CaptureFixture[str], argv: list[str], names: str) -> str:
    """Run `main(argv)`, expect exit 2 and one 'sfm: error:' line naming `names`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sfm: error: ") and names in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


# ---- happy paths -------------------------------------------------------------------------


def test_encode_writes_codes(encoded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with np.load(encoded) as npz:
        codes = npz["codes"]
        assert codes.dtype == np.int16 and codes.shape == (4, 50)
        assert codes.min() >= 0 and codes.max() < 64
        assert int(npz["sample_rate"]) == 24000 and float(npz["frame_rate"]) == 50.0
        assert int(npz["n_samples"]) == 24000


@pytest.fixture(scope="module")
def decoded(work: Path, encoded: Path) -> Path:
    """`sfm codec decode` of the encoded test WAV."""
    assert main(["codec", "decode", str(encoded), str(work / "decoded.wav"), *TINY]) == 0
    return work / "decoded.wav"


def test_decode_writes_wav(decoded: Path) -> None:
    info = sf.info(decoded)
    assert info.samplerate == 24000 and info.frames == 24000 and info.channels == 1


def test_roundtrip_prints_report(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = work / "rt.wav"
    assert main(["codec", "roundtrip", str(work / "in.wav"), "--out", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    rows = dict(line.split("  ", 1) for line in text.strip().splitlines())
    assert rows.keys() >= {"mel distance", "SI-SDR", "bitrate", "encode real-time factor"}
    assert rows["codes per second"].strip() == "200"
    assert rows["bitrate"].strip() == "1.200 kbps"
    assert sf.info(out).frames == 24000


def test_overrides_after_options(work: Path, encoded: Path, decoded: Path) -> None:
    out = work / "seed1.wav"
    assert main(["codec", "decode", str(encoded), str(out), *TINY, "seed=1"]) == 0
    assert not np.array_equal(sf.read(out)[0], sf.read(decoded)[0])


def test_checkpoint_carries_its_config(work: Path, encoded: Path) -> None:
    cfg = load_run_config("tiny", None, ())
    ckpt = work / "tiny.safetensors"
    save_params(build_codec(cfg), ckpt, dump_yaml(cfg))
    out = work / "from_ckpt.npz"
    argv = ["codec", "encode", str(work / "in.wav"), str(out), "--checkpoint", str(ckpt)]
    assert main(argv) == 0
    with np.load(out) as a, np.load(encoded) as b:
        np.testing.assert_array_equal(a["codes"], b["codes"])


def test_kyutai_layout_checkpoint(
    work: Path, encoded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--checkpoint` also takes a Mimi in Kyutai's safetensors layout (e.g. Moshi's release)."""
    cfg = load_run_config("tiny", None, ())
    ckpt = work / "kyutai_layout.safetensors"
    export_mimi(build_codec(cfg), ckpt)
    out = work / "from_kyutai.npz"
    argv = ["codec", "encode", str(work / "in.wav"), str(out), "--checkpoint", str(ckpt), *TINY]
    assert main(argv) == 0
    with np.load(out) as a, np.load(encoded) as b:
        np.testing.assert_array_equal(a["codes"], b["codes"])
    # The same file under the full Mimi config: one line naming the file, exit 2.
    argv = ["codec", "encode", str(work / "in.wav"), str(out), "--checkpoint", str(ckpt)]
    assert "does the codec config match" in _run_error(capsys, argv, "kyutai_layout.safetensors")


def test_console_entry_point(work: Path, cache_dir: Path) -> None:
    env = {**os.environ, CACHE_ENV: str(cache_dir), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "sfm", "codec", "roundtrip", "in.wav", *TINY],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "SI-SDR" in proc.stdout


def test_chunked_streaming_equals_offline(encoded: Path) -> None:
    """Several 25-frame chunks with a padded last one give the offline result, trimmed."""
    model = build_codec(load_run_config("tiny", None, ()))
    codec = streaming_codec(model)
    frames = 2 * CHUNK_FRAMES + 7
    codes_kt = np.random.default_rng(0).integers(0, 64, (4, frames), dtype=np.int32)
    n_samples = frames * 480 - 100
    wav_t = decode_codes(codec, codes_kt, n_samples)
    offline = np.asarray(model.decode(jnp.asarray(codes_kt[None])))[0]
    assert wav_t.shape == (n_samples,)
    np.testing.assert_allclose(wav_t, offline[:n_samples], atol=1e-5)
    assert encode_wav(codec, wav_t).shape == (4, frames)


# ---- bad audio ---------------------------------------------------------------------------


def _wav_case(work: Path, case: str) -> Path:
    """Write one kind of bad audio file and return its path."""
    path = work / f"bad_{case}.wav"
    if case == "text":
        path.write_text("not audio at all\n")
    elif case == "truncated":
        sf.write(path, np.zeros(24000, np.float32), 24000)
        path.write_bytes(path.read_bytes()[:20000])
    elif case == "empty":
        sf.write(path, np.zeros(0, np.float32), 24000)
    elif case == "nan":
        sf.write(path, np.full(100, np.nan, np.float32), 24000, subtype="FLOAT")
    return path


@pytest.mark.parametrize(
    "case,reason",
    [
        ("missing", "no such file"),
        ("text", "not a readable audio file"),
        ("truncated", "truncated"),
        ("empty", "empty audio"),
        ("nan", "NaN"),
    ],
)
@pytest.mark.parametrize("command", ["encode", "roundtrip"])
def test_bad_audio(
    work: Path, capsys: pytest.CaptureFixture[str], case: str, reason: str, command: str
) -> None:
    path = _wav_case(work, case)
    argv = ["codec", command, str(path), *([str(work / "x.npz")] if command == "encode" else [])]
    assert reason in _run_error(capsys, [*argv, *TINY], str(path))


def test_channel_out_of_range(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["codec", "encode", str(work / "in.wav"), str(work / "x.npz"), "--channel", "1"]
    assert "channel 1 out of range" in _run_error(capsys, [*argv, *TINY], "in.wav")


def test_unwritable_output(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = work / "in.wav" / "codes.npz"
    _run_error(capsys, ["codec", "encode", str(work / "in.wav"), str(out), *TINY], "in.wav")


# ---- bad config and checkpoints ----------------------------------------------------------


def test_bad_dialogue_share(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["data", "dialogues", "--out", str(work / "dia"), "--interrupted", "1.5"]
    _run_error(capsys, argv, "interrupted: a share in [0, 1], got 1.5")
    assert not (work / "dia" / "manifest.jsonl").exists()


def test_unknown_preset(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["codec", "encode", str(work / "in.wav"), str(work / "x.npz"), "--config", "huge"]
    assert "presets:" in _run_error(capsys, argv, "huge")


def test_unknown_override(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["codec", "encode", str(work / "in.wav"), str(work / "x.npz"), *TINY, "codec.nq=2"]
    _run_error(capsys, argv, "codec.nq")


@pytest.mark.parametrize("case", ["missing", "truncated", "mismatch"])
def test_bad_checkpoint(work: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    ckpt = work / f"{case}.safetensors"
    if case != "missing":
        cfg = load_run_config("tiny", None, ())
        small = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        save_params(build_codec(cfg) if case == "truncated" else small, ckpt, dump_yaml(cfg))
    if case == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:-100])
    argv = ["codec", "encode", str(work / "in.wav"), str(work / "x.npz"), "--checkpoint", str(ckpt)]
    line = _run_error(capsys, argv, str(ckpt))
    expect = {
        "missing": "no such checkpoint file",
        "truncated": "not a readable safetensors",
        "mismatch": "does not match the config",
    }[case]
    assert expect in line


# ---- bad code files ----------------------------------------------------------------------


def _npz_case(work: Path, case: str) -> Path:
    """Write one kind of bad code file and return its path."""
    path = work / f"bad_{case}.npz"
    codes = np.zeros((4, 10), np.int16)
    if case == "no_codes":
        np.savez(path, tokens=codes)
    elif case == "out_of_range":
        codes[2, 3] = 64
        np.savez(path, codes=codes)
    elif case == "wrong_n_q":
        np.savez(path, codes=codes[:3])
    elif case == "not_npz":
        path.write_text("hello")
    return path


@pytest.mark.parametrize(
    "case,reason",
    [
        ("missing", "no such file"),
        ("no_codes", "no 'codes' array"),
        ("out_of_range", "out of range [0, 64)"),
        ("wrong_n_q", "3 codebooks"),
        ("not_npz", "not a readable .npz"),
    ],
)
def test_bad_codes(work: Path, capsys: pytest.CaptureFixture[str], case: str, reason: str) -> None:
    path = _npz_case(work, case)
    argv = ["codec", "decode", str(path), str(work / "x.wav"), *TINY]
    assert reason in _run_error(capsys, argv, str(path))


# ---- quickstart --------------------------------------------------------------------------


def test_quickstart_without_espeak(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(work / "empty_path"))
    line = _run_error(capsys, ["quickstart", "--out", str(work / "qs")], "espeak-ng")
    assert "bash launch/setup.sh" in line


# ---- data tokenize-text ------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_model(work: Path) -> Path:
    """A small SentencePiece model and a text file with a blank line, via the CLI."""
    lines = sentences(200, 0)
    (work / "text.txt").write_text("\n".join([*lines[:5], "", *lines[5:]]) + "\n")
    args = ["data", "train-tokenizer", "--text", str(work / "text.txt"), "--vocab", "150"]
    assert main([*args, "--out", str(work / "spm")]) == 0
    return work / "spm.model"


def test_tokenize_text_writes_shards(
    work: Path, text_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    args = ["data", "tokenize-text", str(work / "text.txt"), "--tokenizer", str(text_model)]
    args += ["--out", str(work / "text_shards"), "--seq-tokens", "64", "--shard-size", "16"]
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    assert "201 lines (1 empty, skipped)" in line and "already complete 0" in line
    shards = sorted((work / "text_shards").glob("text-*-of-*.array_record"))
    assert len(shards) >= 2 and f"shards written {len(shards)}" in line
    assert main(args) == 0
    assert f"already complete {len(shards)}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case, names",
    [("missing", "nope.txt"), ("blank", "blank.txt"), ("model", "text.txt"), ("binary", "bin")],
)
def test_tokenize_text_errors(
    work: Path, text_model: Path, capsys: pytest.CaptureFixture[str], case: str, names: str
) -> None:
    (work / "blank.txt").write_text("\n  \n\n")
    (work / "bin.txt").write_bytes(b"ok\n\xff\xfe\x00 bytes\n")
    text = {"missing": "nope.txt", "blank": "blank.txt", "binary": "bin.txt"}.get(case, "text.txt")
    model = work / "text.txt" if case == "model" else text_model
    args = ["data", "tokenize-text", str(work / text), "--tokenizer", str(model)]
    _run_error(capsys, [*args, "--out", str(work / f"err_{case}")], names)
