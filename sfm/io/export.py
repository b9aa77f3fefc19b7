"""`sfm export`: a run's weights as a self-checking folder, in sfm's own format or in the
layout of Kyutai's Hugging Face repos (which moshi's loaders read).

The source is a run directory (its `lm.safetensors` and/or `codec.safetensors`) or one sfm
weights file. Every export holds a `manifest.json`, written last:
`{"format": "sfm" | "moshi" | "stablehlo", "files": {name: {"sha256": ..., "bytes": ...}}}`,
listing every other file; `verify_export` re-hashes them. Reading an export never runs
Python code from it: JSON, YAML (safe), safetensors, and (stablehlo) serialized StableHLO.

- "sfm": the weight files copied as they are, and the weights' stored config as
  `config.yaml`; `sfm.io.weights.load_weights(model, folder)` loads the file of its model.
- "moshi": the LM as `model.safetensors` (Kyutai's layout, fused attention projections),
  the codec as `mimi.safetensors` with its moshi config in `mimi_config.json` (a Kyutai
  Mimi given as --codec is copied as it is, without one), and `config.json` holding moshi's
  `lm_kwargs` with the file names, as in Kyutai's repos.
- "stablehlo": the engine's functions and their weights (`sfm.infer.stablehlo` writes it
  with `write_export`; `verify_export` checks it like the others).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, cast

import jax.numpy as jnp
from flax import nnx

from sfm.codec.model import Mimi
from sfm.config import Config, dump_yaml, load_stored_config
from sfm.io.params import load_params, read_config_yaml, save_params
from sfm.io.tensors import (
    CheckpointError,
    InteropError,
    PathLike,
    read_tensors,
    tensor_names,
    widen,
)
from sfm.io.weights import DESCRIPTIONS, checkpoint_format
from sfm.lm.model import LM

Kind = Literal["lm", "codec"]
ExportFormat = Literal["sfm", "moshi"]
FORMATS: tuple[str, ...] = ("sfm", "moshi", "stablehlo")  # stablehlo: see sfm.infer.stablehlo
MANIFEST = "manifest.json"
# The weight file of each model in each format, and each format's config file.
WEIGHT_FILES: dict[str, dict[Kind, str]] = {
    "sfm": {"lm": "lm.safetensors", "codec": "codec.safetensors"},
    "moshi": {"lm": "model.safetensors", "codec": "mimi.safetensors"},
}
CONFIG_FILES: dict[str, str] = {"sfm": "config.yaml", "moshi": "config.json"}
MIMI_CONFIG = "mimi_config.json"  # a moshi export's codec config (moshi's `mimi_config_name`)
# The files a stablehlo export (the engine's functions and their weights) must hold.
STABLEHLO_FILES: tuple[str, ...] = (
    "serving.json",
    "weights.safetensors",
    "init.jaxexport",
    "reset.jaxexport",
    "step.jaxexport",
)
_KIND_NAMES: dict[Kind, str] = {"lm": "an LM", "codec": "a Mimi codec"}
_CHUNK = 1 << 20

# ---- sources -----------------------------------------------------------------------------------


def sfm_kind(path: PathLike) -> Kind:
    """Whether the sfm weights file at `path` holds an LM or a codec (from its tensor names);
    CheckpointError naming the file when it is not an sfm weights file."""
    fmt = checkpoint_format(path)
    if fmt != "sfm":
        raise CheckpointError(
            f"{os.fspath(path)}: {DESCRIPTIONS[fmt]}, not an sfm weights file "
            "(expected a run directory or a file written by sfm)"
        )
    names = tensor_names(path)
    if "text_emb/embedding" in names:
        return "lm"
    if any(name.startswith("quantizer/") for name in names):
        return "codec"
    raise CheckpointError(f"{os.fspath(path)}: sfm weights of neither an LM nor a Mimi codec")


def find_weights(source: PathLike) -> dict[Kind, Path]:
    """The sfm weight files of a run directory (or of an sfm export, verified first), or the
    one file `source` names, by model kind."""
    src = Path(source)
    if src.is_file():
        return {sfm_kind(src): src}
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such run directory or sfm weights file")
    if (src / MANIFEST).exists() and (fmt := verify_export(src)["format"]) != "sfm":
        raise CheckpointError(f"{src}: a {fmt} export, not a run directory or an sfm export")
    found: dict[Kind, Path] = {}
    for kind, name in WEIGHT_FILES["sfm"].items():
        if (src / name).is_file():
            if sfm_kind(src / name) != kind:
                raise CheckpointError(f"{src / name}: not the weights of {_KIND_NAMES[kind]}")
            found[kind] = src / name
    if not found:
        raise CheckpointError(
            f"{src}: no lm.safetensors or codec.safetensors (expected a run directory or an "
            "sfm weights file)"
        )
    return found


def stored_config(path: PathLike) -> Config:
    """The run config stored in the sfm weights file at `path`."""
    text = read_config_yaml(path)
    if text is None:
        raise CheckpointError(f"{os.fspath(path)}: no stored config (not an sfm weights file)")
    return load_stored_config(text, os.fspath(path))


def _abstract(kind: Kind, cfg: Config) -> LM | Mimi:
    """The model of `kind` and `cfg` without initialised weights (no compile, no memory)."""
    if kind == "lm":
        return nnx.eval_shape(lambda: LM(cfg.lm, rngs=nnx.Rngs(0)))
    return nnx.eval_shape(lambda: Mimi(cfg.codec, rngs=nnx.Rngs(0)))


def load_sfm(path: PathLike, kind: Kind | None = None) -> LM | Mimi:
    """The model in the sfm weights file at `path`, built from its stored config."""
    kind = kind or sfm_kind(path)
    model = _abstract(kind, stored_config(path))
    load_params(model, path)
    return model


def _load_kyutai_mimi(path: PathLike, cfg: Config) -> Mimi:
    """A Mimi in Kyutai's layout, as an sfm Mimi of `cfg.codec`."""
    from sfm.io.mimi import torch_to_sfm

    tensors = {k: widen(v) for k, v in read_tensors(path).items()}
    flat = torch_to_sfm(tensors, cfg.codec, source=os.fspath(path))
    model = _abstract("codec", cfg)
    for key_path, var in nnx.to_flat_state(nnx.state(model)):
        key, want = "/".join(str(p) for p in key_path), var.get_value()
        if tuple(flat[key].shape) != tuple(want.shape):
            raise CheckpointError(
                f"{os.fspath(path)}: {key} has shape {tuple(flat[key].shape)}, the codec "
                f"config expects {tuple(want.shape)}"
            )
        var.set_value(jnp.asarray(flat[key], want.dtype))
    return model  # type: ignore[return-value]


def _codec_source(codec: PathLike) -> tuple[Path, bool]:
    """(path, is sfm) of a --codec file: sfm codec weights or a Mimi in Kyutai's layout."""
    path = Path(codec)
    fmt = checkpoint_format(path)
    if fmt == "sfm":
        if sfm_kind(path) != "codec":
            raise CheckpointError(f"{path}: an sfm LM, not a codec (expected for --codec)")
        return path, True
    if fmt != "kyutai-mimi":
        raise CheckpointError(f"{path}: {DESCRIPTIONS[fmt]}, not a codec (expected for --codec)")
    return path, False


# ---- manifest ----------------------------------------------------------------------------------


def file_digest(path: PathLike) -> dict[str, Any]:
    """{"sha256": hex digest, "bytes": size} of the file at `path`, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "bytes": size}


def write_manifest(folder: PathLike, fmt: str) -> Path:
    """Write `folder/manifest.json` listing every other file of `folder`."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {"format": fmt, "files": {name: file_digest(folder / name) for name in names}}
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such export directory")
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (expected a folder written by sfm export)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a valid export manifest (bad JSON)") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") not in FORMATS:
        raise CheckpointError(f"{path}: not a valid export manifest (format and files expected)")
    for name, entry in files.items():
        bad_name = name in ("", ".", "..", MANIFEST) or "/" in name or os.sep in name
        if bad_name or not isinstance(entry, dict) or {"sha256", "bytes"} - set(entry):
            raise CheckpointError(f"{path}: not a valid export manifest (entry {name!r})")
    return manifest


def verify_export(folder: PathLike) -> dict[str, Any]:
    """Check an export against its manifest and return the manifest. CheckpointError naming
    the file when a listed file is missing or changed, or a file of the format is present or
    required but not listed."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    fmt, files = manifest["format"], manifest["files"]
    if fmt == "stablehlo":
        known, required = list(STABLEHLO_FILES), list(STABLEHLO_FILES)
    else:
        weights = WEIGHT_FILES[fmt]
        known = [*weights.values(), CONFIG_FILES[fmt]]
        required = [CONFIG_FILES[fmt]] if fmt == "sfm" or weights["lm"] in files else []
        if not any(name in files for name in weights.values()):
            required.append(weights["lm"])
    for name in known:
        if name not in files and (folder / name).exists():
            raise CheckpointError(f"{folder / name}: not listed in {MANIFEST}")
    for name in required:
        if name not in files:
            raise CheckpointError(f"{folder / name}: missing from the export (not in {MANIFEST})")
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {MANIFEST} but missing")
        if path.stat().st_size != entry["bytes"] or file_digest(path) != entry:
            raise CheckpointError(f"{path}: changed since export (differs from its {MANIFEST})")
    return manifest


def export_weights_file(folder: PathLike, kind: Kind) -> Path:
    """The verified weight file of the model `kind` in an export folder."""
    folder = Path(folder)
    fmt = verify_export(folder)["format"]
    if fmt not in WEIGHT_FILES:
        raise CheckpointError(f"{folder}: a {fmt} export holds no model weights to load")
    name = WEIGHT_FILES[fmt][kind]
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{folder}: an export with no {name} ({_KIND_NAMES[kind]}'s weights)")
    return path


# ---- export ------------------------------------------------------------------------------------


def _primary(found: Mapping[Kind, Path]) -> Path:
    """The file whose config describes the export: the LM's, else the codec's."""
    return found["lm"] if "lm" in found else found["codec"]


def _export_sfm(found: Mapping[Kind, Path], codec: PathLike | None, out: Path) -> None:
    primary = _primary(found)
    for path in found.values():
        shutil.copyfile(path, out / WEIGHT_FILES["sfm"][sfm_kind(path)])
    if codec is not None:
        path, is_sfm = _codec_source(codec)
        target = out / WEIGHT_FILES["sfm"]["codec"]
        if is_sfm:
            shutil.copyfile(path, target)
        else:  # converted to sfm's layout, with the run's config
            cfg = stored_config(primary)
            save_params(_load_kyutai_mimi(path, cfg), target, dump_yaml(cfg))
    (out / CONFIG_FILES["sfm"]).write_text(dump_yaml(stored_config(primary)))


def _export_moshi(found: Mapping[Kind, Path], codec: PathLike | None, out: Path) -> None:
    from sfm.io.mimi import export_mimi, moshi_config
    from sfm.io.moshi_lm import export_moshi_lm
    from sfm.io.moshi_lm_config import moshi_lm_kwargs

    names = WEIGHT_FILES["moshi"]
    mimi: Mimi | None = None
    kyutai_mimi: Path | None = None  # already in the target layout: copied byte for byte
    if codec is not None:
        path, is_sfm = _codec_source(codec)
        if is_sfm:
            mimi = cast(Mimi, load_sfm(path, "codec"))
        else:
            kyutai_mimi = path
    elif "codec" in found:
        mimi = cast(Mimi, load_sfm(found["codec"], "codec"))
    if "lm" in found:
        lm = cast(LM, load_sfm(found["lm"], "lm"))
        try:  # fails before any file is written
            config: dict[str, Any] = dict(moshi_lm_kwargs(lm.cfg))
        except InteropError as err:
            raise InteropError(f"{found['lm']}: no moshi equivalent: {err}") from None
        config.update(model_type="moshi", moshi_name=names["lm"])
        if mimi is not None or kyutai_mimi is not None:
            config["mimi_name"] = names["codec"]
        if mimi is not None:
            config["mimi_config_name"] = MIMI_CONFIG
        export_moshi_lm(lm, out / names["lm"])
        (out / CONFIG_FILES["moshi"]).write_text(json.dumps(config, indent=2) + "\n")
    if mimi is not None:  # its config too: moshi assumes the released Mimi's otherwise
        export_mimi(mimi, out / names["codec"])
        (out / MIMI_CONFIG).write_text(json.dumps(moshi_config(mimi.cfg), indent=2) + "\n")
    if kyutai_mimi is not None:
        shutil.copyfile(kyutai_mimi, out / names["codec"])


_EXPORTERS: dict[str, Callable[[Mapping[Kind, Path], PathLike | None, Path], None]] = {
    "sfm": _export_sfm,
    "moshi": _export_moshi,
}


def _add_tokenizer(folder: Path, tokenizer: Path) -> None:
    """Copy the tokenizer into `folder` and name it in a moshi config.json if there is one."""
    shutil.copyfile(tokenizer, folder / tokenizer.name)
    config_path = folder / CONFIG_FILES["moshi"]
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        config["tokenizer_name"] = tokenizer.name
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def export(
    source: PathLike,
    out: PathLike,
    fmt: ExportFormat,
    codec: PathLike | None = None,
    tokenizer: PathLike | None = None,
) -> list[Path]:
    """Export the weights of `source` (a run directory or an sfm weights file), and those of
    `codec` (sfm codec weights or a Kyutai Mimi) when given, to the new folder `out` in
    format `fmt`; `tokenizer` (the text tokenizer's file) is copied in too (and named in a
    moshi config.json as `tokenizer_name`, where moshi's loader looks for it). Returns the
    files written, `manifest.json` last. The folder appears only complete: it is written
    beside `out` and renamed."""
    if fmt not in _EXPORTERS:
        raise CheckpointError(
            f"{fmt}: not a weights format (sfm, moshi; a stablehlo export is written by "
            "sfm.infer.stablehlo.export_stablehlo)"
        )
    found = find_weights(source)
    return write_export(out, fmt, lambda folder: _EXPORTERS[fmt](found, codec, folder), tokenizer)


def write_export(
    out: PathLike, fmt: str, write: Callable[[Path], None], tokenizer: PathLike | None = None
) -> list[Path]:
    """Create the export folder `out` of format `fmt`: `write(folder)` fills it, `tokenizer`
    is copied in, the manifest is written last and the folder renamed into place (it appears
    only complete). Returns the files, `manifest.json` last."""
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise CheckpointError(f"{os.fspath(tokenizer)}: no such tokenizer file")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(errno.EEXIST, "exists and is not an empty directory", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the export is not
    try:
        write(staging)
        if tokenizer is not None:
            _add_tokenizer(staging, Path(tokenizer))
        write_manifest(staging, fmt)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    names = sorted(p.name for p in target.iterdir() if p.name != MANIFEST)
    return [*(target / name for name in names), target / MANIFEST]
