"""`load_weights` tells the three checkpoint formats apart and loads each into its model."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from sfm.codec.model import Mimi
from sfm.config import dump_yaml, load_config
from sfm.io.mimi import export_mimi
from sfm.io.moshi_lm import export_moshi_lm
from sfm.io.params import save_params
from sfm.io.tensors import CheckpointError, write_tensors
from sfm.io.weights import checkpoint_format, load_weights
from sfm.lm.model import LM

TINY = Path(__file__).resolve().parents[1] / "configs" / "lm" / "tiny.yaml"


def _params(model: nnx.Module) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny LM and codec (seed 1) in every format."""
    cfg, tmp = load_config(TINY), tmp_path_factory.mktemp("weights")
    lm, codec = LM(cfg.lm, rngs=nnx.Rngs(1)), Mimi(cfg.codec, rngs=nnx.Rngs(1))
    out = {name: tmp / f"{name}.safetensors" for name in ("sfm", "moshi-lm", "kyutai-mimi")}
    save_params(lm, out["sfm"], dump_yaml(cfg))
    export_moshi_lm(lm, out["moshi-lm"])
    export_mimi(codec, out["kyutai-mimi"])
    return out


def test_each_format_is_recognised_and_loads_into_its_model(files: dict[str, Path]) -> None:
    cfg = load_config(TINY)
    want_lm = _params(LM(cfg.lm, rngs=nnx.Rngs(1)))
    for name in ("sfm", "moshi-lm"):
        assert checkpoint_format(files[name]) == name
        lm = LM(cfg.lm, rngs=nnx.Rngs(7))
        assert load_weights(lm, files[name]) == name
        for got, want in zip(_params(lm), want_lm, strict=True):
            np.testing.assert_array_equal(got, want)
    codec = Mimi(cfg.codec, rngs=nnx.Rngs(7))
    assert load_weights(codec, files["kyutai-mimi"]) == "kyutai-mimi"
    for got, want in zip(_params(codec), _params(Mimi(cfg.codec, rngs=nnx.Rngs(1))), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_checkpoint_for_the_other_model_or_no_format_is_one_line(
    files: dict[str, Path], tmp_path: Path
) -> None:
    cfg = load_config(TINY)
    with pytest.raises(CheckpointError) as err:
        load_weights(Mimi(cfg.codec, rngs=nnx.Rngs(0)), files["moshi-lm"])
    assert str(err.value) == f"{files['moshi-lm']}: a Moshi LM in Kyutai's layout, not a Mimi codec"
    with pytest.raises(CheckpointError, match="a Mimi codec in Kyutai's layout, not an LM"):
        load_weights(LM(cfg.lm, rngs=nnx.Rngs(0)), files["kyutai-mimi"])
    write_tensors(tmp_path / "other.safetensors", {"w": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match=r"not an sfm checkpoint .*\(first tensor: 'w'\)$"):
        checkpoint_format(tmp_path / "other.safetensors")


def test_a_text_lm_given_as_a_checkpoint_points_to_init_text_from(tmp_path: Path) -> None:
    write_tensors(tmp_path / "llama.safetensors", {"model.embed_tokens.weight": np.zeros((4, 2))})
    with pytest.raises(CheckpointError, match="a Llama-style text LM, .* train.init_text_from$"):
        checkpoint_format(tmp_path / "llama.safetensors")
