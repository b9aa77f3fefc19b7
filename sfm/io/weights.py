"""One entry for loading weights: `load_weights(model, path)` recognises the file's format.

Formats, told apart from the safetensors header alone:
- "sfm": written by `sfm.io.params.save_params` (the run's config in the metadata);
- "kyutai-mimi": a Mimi codec in Kyutai's layout (e.g. the one released with Moshi);
- "moshi-lm": a Moshi LM in Kyutai's layout (fused or per-step attention projections).

A folder written by `sfm export` is accepted too: its manifest is verified, then the
model's own weight file in it is loaded.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

from flax import nnx

from sfm.codec.model import Mimi
from sfm.io.params import CONFIG_KEY, load_params
from sfm.io.tensors import CheckpointError, PathLike, read_header
from sfm.lm.model import LM

log = logging.getLogger(__name__)
Format = Literal["sfm", "kyutai-mimi", "moshi-lm"]
DESCRIPTIONS: dict[str, str] = {
    "sfm": "an sfm checkpoint",
    "kyutai-mimi": "a Mimi codec in Kyutai's layout",
    "moshi-lm": "a Moshi LM in Kyutai's layout",
}
_KYUTAI_PREFIXES: dict[str, str] = {
    "kyutai-mimi": "encoder.model.0.conv",
    "moshi-lm": "depformer_in.",
}


def checkpoint_format(path: PathLike) -> Format:
    """The format of the safetensors file at `path`; CheckpointError when it is none of them."""
    tensors, metadata, _ = read_header(path)
    if CONFIG_KEY in metadata:
        return "sfm"
    for fmt, prefix in _KYUTAI_PREFIXES.items():
        if any(name.startswith(prefix) for name in tensors):
            return fmt  # type: ignore[return-value]
    if "model.embed_tokens.weight" in tensors:
        raise CheckpointError(
            f"{os.fspath(path)}: a Llama-style text LM, not a full checkpoint: pass it as "
            "train.init_text_from"
        )
    first = next(iter(tensors), None)
    raise CheckpointError(
        f"{os.fspath(path)}: not an sfm checkpoint (no {CONFIG_KEY} metadata), a Kyutai Mimi "
        f"or a Moshi LM (first tensor: {first!r})"
    )


def _kind(model: nnx.Module) -> str:
    return {Mimi: "a Mimi codec", LM: "an LM"}.get(type(model), type(model).__name__)


def load_weights(model: nnx.Module, path: PathLike) -> Format:
    """Load the checkpoint at `path` into `model` (a `Mimi` or an `LM` of a matching config),
    whatever its format; returns the format found, which is also logged. `path` may be a
    folder written by `sfm export` (checked against its manifest first)."""
    if os.path.isdir(path):
        from sfm.io.export import export_weights_file

        if not isinstance(model, LM | Mimi):
            raise CheckpointError(f"{os.fspath(path)}: an export holds no {_kind(model)}")
        path = export_weights_file(path, "lm" if isinstance(model, LM) else "codec")
    fmt = checkpoint_format(path)
    wanted = {"kyutai-mimi": Mimi, "moshi-lm": LM}.get(fmt)
    if wanted is not None and not isinstance(model, wanted):
        raise CheckpointError(f"{os.fspath(path)}: {DESCRIPTIONS[fmt]}, not {_kind(model)}")
    if fmt == "kyutai-mimi":
        from sfm.io.mimi import load_kyutai_into

        load_kyutai_into(model, path)  # type: ignore[arg-type]
    elif fmt == "moshi-lm":
        from sfm.io.moshi_lm import import_moshi_lm

        imported = import_moshi_lm(path, cfg=model.cfg)  # type: ignore[attr-defined]
        nnx.update(model, nnx.state(imported, nnx.Param))
    else:
        load_params(model, path)
    log.info("%s: loaded %s", os.fspath(path), DESCRIPTIONS[fmt])
    return fmt
