"""`sfm export`: sfm and moshi folders of a run's weights, checked by their manifest, loaded
back by sfm and (the moshi layout) by moshi's own PyTorch code."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sfm.cli import main  # noqa: E402
from sfm.codec.model import Mimi  # noqa: E402
from sfm.config import Config, dump_yaml, load_config, resolve_preset  # noqa: E402
from sfm.io.export import MANIFEST, export, verify_export  # noqa: E402
from sfm.io.params import save_params  # noqa: E402
from sfm.io.tensors import CheckpointError, write_tensors  # noqa: E402
from sfm.io.weights import load_weights  # noqa: E402
from sfm.lm.layout import delay  # noqa: E402
from sfm.lm.model import LM  # noqa: E402
from sfm.testing.moshi_reference import build_moshi_lm, random_lm_codes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOGIT_TOL = 1e-4
BATCH, FRAMES = 2, 12


def _state(model: nnx.Module, *filters: type) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, *filters))]


def _assert_same(got: nnx.Module, want: nnx.Module) -> None:
    for a, b in zip(_state(got), _state(want), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def lm_cfg() -> Config:
    """The tiny duplex run; its depformer's gated width (85) has no moshi equivalent, 64 has."""
    return load_config(resolve_preset("tiny_duplex", "train"), ["lm.depth.dim_feedforward=96"])


@pytest.fixture(scope="module")
def lm(lm_cfg: Config) -> LM:
    """A random tiny LM whose RMSNorm scales are not all 1 (a misplaced one would show)."""
    model = LM(lm_cfg.lm, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "alpha":
            value = 1.0 + 0.2 * rng.standard_normal(var.get_value().shape)
            var.set_value(jnp.asarray(value, var.get_value().dtype))
    return model


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory, lm: LM, lm_cfg: Config) -> Path:
    """A finished LM run's folder, as `LMTask.export` leaves it."""
    run = tmp_path_factory.mktemp("lm_run")
    save_params(lm, run / "lm.safetensors", dump_yaml(lm_cfg))
    return run


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory) -> tuple[Mimi, Path]:
    """A random tiny codec and a finished codec run's folder holding it."""
    cfg = load_config(resolve_preset("tiny_codec", "train"))
    model = Mimi(cfg.codec, rngs=nnx.Rngs(1))
    run = tmp_path_factory.mktemp("codec_run")
    save_params(model, run / "codec.safetensors", dump_yaml(cfg))
    return model, run


@pytest.fixture(scope="module")
def sfm_export(tmp_path_factory: pytest.TempPathFactory, lm_run: Path) -> Path:
    out = tmp_path_factory.mktemp("exports") / "sfm"
    export(lm_run, out, "sfm")
    return out


def test_sfm_export_round_trips_exactly(sfm_export: Path, lm: LM, lm_cfg: Config) -> None:
    manifest = json.loads((sfm_export / MANIFEST).read_text())
    assert manifest["format"] == "sfm"
    assert sorted(manifest["files"]) == ["config.yaml", "lm.safetensors"]
    assert (
        manifest["files"]["lm.safetensors"]["bytes"]
        == (sfm_export / "lm.safetensors").stat().st_size
    )
    assert load_config(sfm_export / "config.yaml") == lm_cfg
    fresh = LM(lm_cfg.lm, rngs=nnx.Rngs(7))
    assert load_weights(fresh, sfm_export) == "sfm"
    _assert_same(fresh, lm)
    with pytest.raises(CheckpointError, match=r"an export with no codec.safetensors"):
        load_weights(Mimi(lm_cfg.codec, rngs=nnx.Rngs(0)), sfm_export)


def test_a_changed_missing_or_unlisted_file_is_named(sfm_export: Path, tmp_path: Path) -> None:
    def copy(name: str) -> Path:
        return Path(shutil.copytree(sfm_export, tmp_path / name))

    tampered = copy("tampered")
    data = bytearray((tampered / "lm.safetensors").read_bytes())
    data[-1] ^= 1
    (tampered / "lm.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_weights(LM(load_config(tampered / "config.yaml").lm, rngs=nnx.Rngs(0)), tampered)
    assert (
        str(err.value)
        == f"{tampered / 'lm.safetensors'}: changed since export (differs from its manifest.json)"
    )

    deleted = copy("deleted")
    (deleted / "config.yaml").unlink()
    with pytest.raises(
        CheckpointError, match=f"^{deleted / 'config.yaml'}: listed in manifest.json but missing$"
    ):
        verify_export(deleted)

    unlisted = copy("unlisted")
    manifest = json.loads((unlisted / MANIFEST).read_text())
    del manifest["files"]["lm.safetensors"]
    (unlisted / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"^{unlisted / 'lm.safetensors'}: not listed in"):
        verify_export(unlisted)
    (unlisted / "lm.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"^{unlisted / 'lm.safetensors'}: missing from"):
        verify_export(unlisted)


def test_sources_that_are_not_sfm_weights_are_one_line(tmp_path: Path, sfm_export: Path) -> None:
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'none'}: no such run directory"):
        export(tmp_path / "none", tmp_path / "out", "sfm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no lm.safetensors or codec.safetensors"):
        export(tmp_path / "empty", tmp_path / "out", "sfm")
    write_tensors(tmp_path / "w.safetensors", {"w": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'w.safetensors'}: not an sfm"):
        export(tmp_path / "w.safetensors", tmp_path / "out", "sfm")
    with pytest.raises(FileExistsError):
        export(sfm_export, sfm_export, "sfm")
    assert not (tmp_path / "out").exists()


def test_a_failed_export_leaves_nothing(lm_run: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="an sfm LM, not a codec"):
        export(lm_run, tmp_path / "out", "moshi", codec=lm_run / "lm.safetensors")
    assert list(tmp_path.iterdir()) == []
    cfg = load_config(resolve_preset("tiny_duplex", "train"))  # depformer width 85: not moshi's
    save_params(LM(cfg.lm, rngs=nnx.Rngs(0)), tmp_path / "lm.safetensors", dump_yaml(cfg))
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'lm.safetensors'}: no moshi equiv"):
        export(tmp_path / "lm.safetensors", tmp_path / "out", "moshi")
    assert not (tmp_path / "out").exists()


def test_moshi_export_runs_in_moshi_with_the_same_logits(
    lm_run: Path, lm: LM, tmp_path: Path
) -> None:
    out = tmp_path / "moshi"
    names = [p.name for p in export(lm_run, out, "moshi")]
    assert names == ["config.json", "model.safetensors", MANIFEST]
    config = json.loads((out / "config.json").read_text())
    assert config.pop("model_type") == "moshi"
    assert config.pop("moshi_name") == "model.safetensors"
    assert "mimi_name" not in config and "tokenizer_name" not in config
    reference = build_moshi_lm(config, seed=3)  # then moshi's own loading, strict
    reference.load_state_dict(load_file(str(out / "model.safetensors")))
    codes = random_lm_codes(config, BATCH, FRAMES)
    with torch.no_grad():
        ref = reference(torch.from_numpy(codes))
    forward = nnx.jit(lambda m, t: (lambda o: (o.text_logits, o.audio_logits))(m(t)))
    text, audio = (np.asarray(x) for x in forward(lm, delay(jnp.asarray(codes), lm.cfg.delays)))
    mask = ref.text_mask[:, 0].numpy()
    assert np.abs(text[mask] - ref.text_logits[:, 0].numpy()[mask]).max() < LOGIT_TOL
    ref_audio, ref_mask = ref.logits.numpy(), ref.mask.numpy()
    for k in range(lm.cfg.dep_q):
        d = lm.cfg.delays[1 + k]
        valid = ref_mask[:, k, : FRAMES - d]
        assert valid.any()
        diff = audio[:, d:, k][valid] - ref_audio[:, k, : FRAMES - d][valid]
        assert np.abs(diff).max() < LOGIT_TOL, k
    assert verify_export(out)["format"] == "moshi"
    fresh = LM(lm.cfg, rngs=nnx.Rngs(7))
    assert load_weights(fresh, out) == "moshi-lm"
    for a, b in zip(_state(fresh, nnx.Param), _state(lm, nnx.Param), strict=True):
        np.testing.assert_array_equal(a, b)


def test_codec_export_to_moshi_reads_back(
    codec: tuple[Mimi, Path], lm_run: Path, tmp_path: Path
) -> None:
    model, run = codec
    out = tmp_path / "mimi"
    names = [p.name for p in export(run, out, "moshi")]
    assert names == ["mimi.safetensors", "mimi_config.json", MANIFEST]
    fresh = Mimi(model.cfg, rngs=nnx.Rngs(7))
    assert load_weights(fresh, out / "mimi.safetensors") == "kyutai-mimi"
    _assert_same(fresh, model)

    both = tmp_path / "both"  # an LM run with a codec given: Kyutai's file given back works too
    export(lm_run, both, "moshi", codec=out / "mimi.safetensors")
    assert json.loads((both / "config.json").read_text())["mimi_name"] == "mimi.safetensors"
    assert (both / "mimi.safetensors").read_bytes() == (out / "mimi.safetensors").read_bytes()


def test_moshi_loads_an_exported_tiny_codec_by_its_config(
    codec: tuple[Mimi, Path], lm_run: Path, tmp_path: Path
) -> None:
    """An LM + non-standard codec export: moshi's CheckpointInfo, given the folder's files,
    builds the codec from mimi_config.json and decodes like sfm."""
    from moshi.models.loaders import CheckpointInfo

    model, run = codec
    out = tmp_path / "both"
    export(lm_run, out, "moshi", codec=run / "codec.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert config["mimi_config_name"] == "mimi_config.json"
    info = CheckpointInfo.from_hf_repo(
        "local",
        moshi_weights=out / "model.safetensors",
        mimi_weights=out / "mimi.safetensors",
        tokenizer=out / "absent.model",
        config_path=out / "config.json",
        mimi_config_path=out / config["mimi_config_name"],
    )
    mimi = info.get_mimi()
    mimi.set_num_codebooks(model.cfg.n_q)
    codes = np.random.default_rng(0).integers(0, model.cfg.quantizer.bins, (1, model.cfg.n_q, 8))
    with torch.no_grad():
        ref = mimi.decode(torch.from_numpy(codes)).numpy()[:, 0]
    wav = np.asarray(model.decode(jnp.asarray(codes, jnp.int32)))
    assert wav.shape == ref.shape and np.abs(wav - ref).max() < 1e-4


def test_an_sfm_export_serves_as_a_codec_checkpoint(
    codec: tuple[Mimi, Path], tmp_path: Path
) -> None:
    """`--checkpoint EXPORT` for the codec commands: the stored config and verified weights."""
    from sfm.io.codec import build_codec, load_run_config

    model, run = codec
    out = tmp_path / "codec_export"
    export(run, out, "sfm")
    cfg = load_run_config(None, out, ())
    assert cfg.codec == model.cfg
    _assert_same(build_codec(cfg, out), model)
    (out / "codec.safetensors").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="codec.safetensors"):
        load_run_config(None, out, ())


def test_a_tokenizer_travels_with_a_moshi_export(lm_run: Path, tmp_path: Path) -> None:
    tokenizer = tmp_path / "tokenizer_spm_32k_3.model"
    tokenizer.write_bytes(b"sentencepiece model bytes")
    out = tmp_path / "with_tokenizer"
    names = [p.name for p in export(lm_run, out, "moshi", tokenizer=tokenizer)]
    assert "tokenizer_spm_32k_3.model" in names
    config = json.loads((out / "config.json").read_text())
    assert config["tokenizer_name"] == "tokenizer_spm_32k_3.model"
    assert verify_export(out)["files"]["tokenizer_spm_32k_3.model"]["bytes"] == 25


def test_cli_export(lm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["export", str(lm_run), str(out), "--format", "sfm"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("config.yaml: ") and lines[1].startswith("lm.safetensors: ")
    assert lines[-1] == f"manifest: {out / MANIFEST}" and len(lines) == 3
    verify_export(out)
    missing = tmp_path / "missing"
    assert main(["export", str(missing), str(tmp_path / "x"), "--format", "moshi"]) == 2
    err = capsys.readouterr().err
    assert err == f"sfm: error: {missing}: no such run directory or sfm weights file\n"
