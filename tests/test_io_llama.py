"""A Llama-style text LM (Hugging Face transformers, random weights) imported as the temporal
transformer: the text logits of sfm's backbone and text head equal the reference's."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sfm.config import load_config  # noqa: E402
from sfm.io.llama import load_text_lm, temporal_config_from_llama  # noqa: E402
from sfm.io.tensors import InteropError  # noqa: E402
from sfm.lm.config import DepthConfig, LMConfig  # noqa: E402
from sfm.lm.layout import IGNORE  # noqa: E402
from sfm.lm.model import LM  # noqa: E402

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
VOCAB, FRAMES = 96, 12
LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=44,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=5000.0,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def _llama(tmp: Path, **kw: object) -> tuple[torch.nn.Module, Path]:
    """A random Llama and its state dict as a safetensors file."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **kw})).eval()
    path = tmp / "llama.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(path))
    return model, path


def _sfm_config(llama: torch.nn.Module, scan_layers: bool = True) -> LMConfig:
    temporal = temporal_config_from_llama(
        llama.config.to_dict(), context=FRAMES, scan_layers=scan_layers
    )
    depth = DepthConfig(dim=16, num_heads=2, num_layers=1, dim_feedforward=24)
    return LMConfig(
        text_card=VOCAB, card=16, n_q=2, dep_q=2, delays=(0,) * 5, temporal=temporal, depth=depth
    )


def _text_logits(model: LM, tokens_bt: np.ndarray) -> np.ndarray:
    """sfm's text logits of a text-only sequence: audio streams absent (-1)."""
    b, t = tokens_bt.shape
    inputs = np.full((b, model.cfg.n_streams, t), IGNORE, np.int32)
    inputs[:, 0] = tokens_bt
    h = model.backbone(jnp.asarray(inputs))
    return np.asarray(model.text_linear(h))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_text_logits_equal_the_reference(tmp_path: Path, scan_layers: bool) -> None:
    llama, path = _llama(tmp_path)
    model = LM(_sfm_config(llama, scan_layers), rngs=nnx.Rngs(1))
    depth_before = nnx.state(model.depth)
    load_text_lm(model, path)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, FRAMES))
    with torch.no_grad():
        want = llama(torch.as_tensor(tokens)).logits.numpy()
    got = _text_logits(model, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(want).max() > 0.1  # not trivially small
    for a, b in zip(
        nnx.to_flat_state(depth_before), nnx.to_flat_state(nnx.state(model.depth)), strict=True
    ):
        np.testing.assert_array_equal(a[1].get_value(), b[1].get_value())  # depth untouched


def test_tied_embeddings_feed_the_text_head(tmp_path: Path) -> None:
    llama, path = _llama(tmp_path, tie_word_embeddings=True)
    model = LM(_sfm_config(llama), rngs=nnx.Rngs(1))
    load_text_lm(model, path)
    tokens = np.arange(FRAMES)[None] % VOCAB
    with torch.no_grad():
        want = llama(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(_text_logits(model, tokens), want, rtol=1e-4, atol=1e-4)


def test_helium_rotates_pairs_and_is_read_from_its_folder(tmp_path: Path) -> None:
    """Helium (Moshi's text LM) rotates adjacent pairs, as sfm does: its config.json says so."""
    torch.manual_seed(0)
    config = transformers.HeliumConfig(**{**LLAMA, "head_dim": 8, "intermediate_size": 45})
    helium = transformers.HeliumForCausalLM(config).eval()
    helium.save_pretrained(tmp_path / "helium", safe_serialization=True)
    model = LM(_sfm_config(helium), rngs=nnx.Rngs(1))
    load_text_lm(model, tmp_path / "helium")
    tokens = np.random.default_rng(2).integers(0, VOCAB, size=(2, FRAMES))
    with torch.no_grad():
        want = helium(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(_text_logits(model, tokens), want, rtol=1e-4, atol=1e-4)


def test_a_sharded_checkpoint_loads_and_its_config_is_checked(tmp_path: Path) -> None:
    llama, _ = _llama(tmp_path)
    llama.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    cfg = _sfm_config(llama)
    model = LM(cfg, rngs=nnx.Rngs(1))
    load_text_lm(model, tmp_path / "sharded" / "model.safetensors.index.json")
    tokens = np.arange(FRAMES)[None] % VOCAB
    with torch.no_grad():
        want = llama(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(_text_logits(model, tokens), want, rtol=1e-4, atol=1e-4)
    other_base = dataclasses.replace(cfg.temporal, max_period=10000.0)
    with pytest.raises(InteropError, match="max_period 5000.0, lm.temporal.max_period is 10000"):
        load_text_lm(
            LM(dataclasses.replace(cfg, temporal=other_base), rngs=nnx.Rngs(0)),
            tmp_path / "sharded",
        )


def test_mismatched_config_and_foreign_files_are_one_line_errors(tmp_path: Path) -> None:
    llama, path = _llama(tmp_path)
    cfg = _sfm_config(llama)
    wider = dataclasses.replace(cfg, temporal=dataclasses.replace(cfg.temporal, dim=48))
    with pytest.raises(InteropError, match=r"model.embed_tokens.weight has shape \(96, 32\)"):
        load_text_lm(LM(wider, rngs=nnx.Rngs(0)), path)
    with pytest.raises(InteropError, match="a vocabulary of 96, lm.text_card is 97"):
        load_text_lm(LM(dataclasses.replace(cfg, text_card=97), rngs=nnx.Rngs(0)), path)
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InteropError, match="missing key model.embed_tokens.weight"):
        load_text_lm(LM(cfg, rngs=nnx.Rngs(0)), tmp_path / "other.safetensors")


def test_train_init_text_from_starts_the_lm_from_the_text_lm(tmp_path: Path) -> None:
    from sfm.train.tasks import LMTask

    llama, path = _llama(tmp_path)
    cfg = load_config(ROOT / "configs" / "train" / "tiny_pretrain.yaml")
    cfg = dataclasses.replace(
        cfg,
        lm=_sfm_config(llama),
        train=dataclasses.replace(cfg.train, init_text_from=str(path)),
    )
    model = LMTask().build_model(cfg)
    tokens = np.arange(FRAMES)[None] % VOCAB
    with torch.no_grad():
        want = llama(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(_text_logits(model, tokens), want, rtol=1e-4, atol=1e-4)
