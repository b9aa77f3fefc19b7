"""The codec of a run: its config (given, stored in the checkpoint, or the Mimi preset) and
its weights (random, or from an sfm or Kyutai checkpoint)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from flax import nnx

from sfm.codec.model import Mimi
from sfm.config import Config, load_config, load_stored_config, resolve_preset
from sfm.io.params import read_config_yaml
from sfm.io.tensors import PathLike
from sfm.io.weights import load_weights

DEFAULT_PRESET = "mimi"


def load_run_config(
    config: str | None, checkpoint: PathLike | None, overrides: Sequence[str]
) -> Config:
    """The run's config: --config, else the checkpoint's stored config, else the Mimi preset.
    A checkpoint is checked to be readable either way."""
    if checkpoint is not None:
        if os.path.isdir(checkpoint):  # an `sfm export` folder: its verified codec file
            from sfm.io.export import export_weights_file

            checkpoint = export_weights_file(checkpoint, "codec")
        stored = read_config_yaml(checkpoint)
        if stored is not None and config is None:
            return load_stored_config(stored, os.fspath(checkpoint), overrides)
    return load_config(resolve_preset(config or DEFAULT_PRESET, "codec"), overrides)


def build_codec(cfg: Config, checkpoint: PathLike | None = None) -> Mimi:
    """The codec of `cfg`, randomly initialised from `cfg.seed` or loaded from `checkpoint`
    (an sfm checkpoint, or a Mimi in Kyutai's safetensors layout such as Moshi's release)."""
    model = Mimi(cfg.codec, rngs=nnx.Rngs(cfg.seed))
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model
