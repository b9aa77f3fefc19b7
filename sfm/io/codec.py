"""The codec of a run: its config (given, stored in the checkpoint, or the Mimi preset) and
its weights (random, or from an sfm or Kyutai checkpoint)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from flax import nnx

from sfm.codec.model import Mimi
from sfm.config import Config, ConfigError, load_config, resolve_preset
from sfm.io.params import read_config_yaml
from sfm.io.tensors import PathLike
from sfm.io.weights import load_weights

DEFAULT_PRESET = "mimi"


def _config_from_checkpoint(checkpoint: PathLike, overrides: Sequence[str]) -> Config | None:
    """The config stored in a checkpoint's metadata with `overrides` applied, if it has one."""
    text = read_config_yaml(checkpoint)
    if text is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sfm_config.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            return load_config(path, overrides)
        except ConfigError as e:
            where = f"{os.fspath(checkpoint)} (stored config)"
            raise ConfigError(str(e).replace(str(path), where)) from None


def load_run_config(
    config: str | None, checkpoint: PathLike | None, overrides: Sequence[str]
) -> Config:
    """The run's config: --config, else the checkpoint's stored config, else the Mimi preset."""
    if checkpoint is not None:
        stored = _config_from_checkpoint(checkpoint, overrides)  # also checks it is readable
        if stored is not None and config is None:
            return stored
    return load_config(resolve_preset(config or DEFAULT_PRESET, "codec"), overrides)


def build_codec(cfg: Config, checkpoint: PathLike | None = None) -> Mimi:
    """The codec of `cfg`, randomly initialised from `cfg.seed` or loaded from `checkpoint`
    (an sfm checkpoint, or a Mimi in Kyutai's safetensors layout such as Moshi's release)."""
    model = Mimi(cfg.codec, rngs=nnx.Rngs(cfg.seed))
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model
