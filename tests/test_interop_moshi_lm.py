"""Parity of the sfm LM with moshi's PyTorch LMModel on the same (random) weights, float32.

Configs:
- "tiny": moshi's own LM unit-test config (moshi/tests/test_lm.py: dim 16, 2 layers, 1 head,
  hidden_scale 1, depformer dim 16, card 32, text_card 48, context 4, delays 0/1/2/4) made
  sfm-compatible: both speakers' codebooks (n_q 6), RMSNorm, SiLU gating, RoPE, no depformer
  positions, one weight set per depformer step, full-rank embeddings. Its context (4) is
  shorter than the sequence, so the attention window is exercised.
- "gqa": grouped-query attention (kv_repeat 2), hidden_scale 4 (moshi's 21/8 gated width) and
  `rms_norm` (eps 1e-5).
- "7b_shaped": Moshi 7B's options at reduced size (dim 256, 4 layers, depformer 128 x 2,
  17 streams, dep_q 8, card 2048).
"""

from __future__ import annotations

import os
from functools import cached_property, partial
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from moshi.models import loaders  # noqa: E402
from moshi.models.lm_utils import _delay_sequence  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from safetensors.torch import save_file as save_torch_file  # noqa: E402

from sfm.io.moshi_lm import (  # noqa: E402
    checkpoint_shapes,
    export_moshi_lm,
    import_moshi_lm,
    sfm_to_torch,
    torch_to_sfm,
)
from sfm.io.moshi_lm_config import lm_config_from_moshi, moshi_lm_kwargs  # noqa: E402
from sfm.io.tensors import CheckpointError, InteropError  # noqa: E402
from sfm.lm.config import LMConfig  # noqa: E402
from sfm.lm.layout import delay  # noqa: E402
from sfm.lm.loss import lm_loss_fn  # noqa: E402
from sfm.lm.model import param_count  # noqa: E402
from sfm.testing.moshi_reference import (  # noqa: E402
    MOSHI_LM_CONFIGS,
    MOSHI_TEST_KWARGS,
    TINY,
    build_moshi_lm,
    numpy_state_dict,
    random_lm_codes,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BATCH = 2
FRAMES = 12
LOGIT_TOL = 1e-4
MOSHI_7B_PARAMS = 7_687_729_152


@partial(jax.jit, static_argnums=(0,))
def _forward(graphdef: Any, state: Any, tokens_bst: jax.Array) -> tuple[jax.Array, jax.Array]:
    out = nnx.merge(graphdef, state)(tokens_bst)
    return out.text_logits, out.audio_logits


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


class Pair:
    """A random moshi LMModel, its checkpoint file and the sfm LM imported from it."""

    def __init__(self, name: str, tmp: Path) -> None:
        self.name, self.kwargs = name, MOSHI_LM_CONFIGS[name]
        self.cfg = lm_config_from_moshi(self.kwargs)
        self.torch_model = build_moshi_lm(self.kwargs)
        self.state_dict = numpy_state_dict(self.torch_model)
        self.checkpoint = tmp / f"{name}.safetensors"
        save_file(self.state_dict, str(self.checkpoint))
        self.model = import_moshi_lm(self.checkpoint, lm_kwargs=self.kwargs)
        self.codes = random_lm_codes(self.kwargs, BATCH, FRAMES)

    @cached_property
    def torch_out(self) -> Any:
        with torch.no_grad():
            return self.torch_model(torch.from_numpy(self.codes))

    @cached_property
    def sfm_out(self) -> tuple[np.ndarray, np.ndarray]:
        tokens = delay(jnp.asarray(self.codes, jnp.int32), self.cfg.delays)
        text, audio = _forward(*nnx.split(self.model), tokens)
        return np.asarray(text), np.asarray(audio)


class PairCache:
    def __init__(self, tmp_factory: pytest.TempPathFactory) -> None:
        self._tmp_factory, self._pairs = tmp_factory, {}

    def __getitem__(self, name: str) -> Pair:
        if name not in self._pairs:
            self._pairs[name] = Pair(name, self._tmp_factory.mktemp(f"lm_{name}"))
        return self._pairs[name]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> PairCache:
    return PairCache(tmp_path_factory)


@pytest.fixture(params=list(MOSHI_LM_CONFIGS))
def pair(request: pytest.FixtureRequest, pairs: PairCache) -> Pair:
    return pairs[request.param]


# ---- logits parity -----------------------------------------------------------------------------


def test_text_logits_match(pair: Pair) -> None:
    ref, mask = pair.torch_out.text_logits[:, 0].numpy(), pair.torch_out.text_mask[:, 0].numpy()
    text, _ = pair.sfm_out
    assert mask.sum() == BATCH * FRAMES  # text is undelayed: every frame is valid
    diff = _max_diff(text[mask], ref[mask])
    print(f"{pair.name}: text logits max |diff| {diff:.2e}")
    assert diff < LOGIT_TOL


def test_every_depformer_step_matches(pair: Pair) -> None:
    """moshi returns undelayed logits; sfm's are in the delayed space (frame t + delay)."""
    ref, mask = pair.torch_out.logits.numpy(), pair.torch_out.mask.numpy()
    _, audio = pair.sfm_out
    diffs = []
    for k in range(pair.cfg.dep_q):
        d = pair.cfg.delays[1 + k]
        valid = mask[:, k, : FRAMES - d]
        assert valid.sum() > 0 and not mask[:, k, FRAMES - d :].any()
        diffs.append(_max_diff(audio[:, d:, k][valid], ref[:, k, : FRAMES - d][valid]))
    print(f"{pair.name}: depformer logits max |diff| per step {[f'{x:.2e}' for x in diffs]}")
    assert max(diffs) < LOGIT_TOL, diffs


def test_delay_matches_moshi(pair: Pair) -> None:
    """sfm's delay (initial token -2) is moshi's `_delay_sequence` with its initial tokens."""
    codes = torch.from_numpy(pair.codes)
    initial = pair.torch_model._get_initial_token().expand(BATCH, -1, -1)
    ref = _delay_sequence(pair.kwargs["delays"], codes, initial).numpy()
    ours = np.asarray(delay(jnp.asarray(pair.codes), pair.cfg.delays))
    initial_ids = np.array([pair.cfg.text_initial] + [pair.cfg.audio_initial] * pair.cfg.n_audio)
    ours = np.where(ours == -2, initial_ids[None, :, None], ours)
    np.testing.assert_array_equal(ours, ref)


# ---- weights -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_weights_round_trip(pair: Pair, fused: bool) -> None:
    back = sfm_to_torch(pair.model, pair.cfg, fused=fused)
    if fused:  # the released-checkpoint form converts back to the same sfm weights
        back = sfm_to_torch(torch_to_sfm(back, pair.cfg), pair.cfg)
    else:  # a param State converts like the model
        back_state = sfm_to_torch(nnx.state(pair.model, nnx.Param), pair.cfg)
        assert all(np.array_equal(back_state[k], v) for k, v in back.items())
    assert list(back) == list(pair.state_dict)
    for key, ref in pair.state_dict.items():
        assert back[key].dtype == ref.dtype, key
        np.testing.assert_array_equal(back[key], ref, err_msg=key)


@pytest.mark.parametrize("fused", [True, False])
def test_export_loads_strictly_into_moshi(pair: Pair, tmp_path: Path, fused: bool) -> None:
    path = tmp_path / "exported.safetensors"
    export_moshi_lm(pair.model, path, fused=fused)
    loaded = loaders.get_moshi_lm(path, lm_kwargs=pair.kwargs, device="cpu", dtype=torch.float32)
    state = loaded.state_dict()
    assert list(state) == list(pair.state_dict)
    for key, value in state.items():
        np.testing.assert_array_equal(value.numpy(), pair.state_dict[key], err_msg=key)


# ---- per-layer parameters (lm.{temporal,depth}.scan_layers false) -----------------------------


@partial(jax.jit, static_argnums=(0,))
def _loss_grads(graphdef: Any, params: Any, tokens: jax.Array, mask: jax.Array) -> Any:
    def loss(p: Any) -> jax.Array:
        return lm_loss_fn(nnx.merge(graphdef, p), {"tokens": tokens, "mask": mask})[0]

    return jax.value_and_grad(loss)(params)


def test_per_layer_parameters_match_moshi_and_the_stacked_layout(pairs: PairCache) -> None:
    """The same checkpoint imported with one parameter set per layer: moshi's weights back
    unchanged, the same logits, and the training loss's gradients equal to the stacked
    layout's, tensor by tensor (both mapped onto moshi's keys)."""
    pair = pairs["7b_shaped"]
    cfg = pair.cfg.with_scan_layers(False)
    model = import_moshi_lm(pair.checkpoint, cfg=cfg)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert "transformer/layers/3/self_attn/in_proj/kernel" in paths
    assert "depth/transformer/layers/1/gating/linear_out/kernel" in paths
    back = sfm_to_torch(model, cfg)
    assert list(back) == list(pair.state_dict)
    for key, ref in pair.state_dict.items():
        np.testing.assert_array_equal(back[key], ref, err_msg=key)

    tokens = delay(jnp.asarray(pair.codes, jnp.int32), cfg.delays)
    text, audio = (np.asarray(x) for x in _forward(*nnx.split(model), tokens))
    mask = pair.torch_out.text_mask[:, 0].numpy()
    assert _max_diff(text[mask], pair.torch_out.text_logits[:, 0].numpy()[mask]) < LOGIT_TOL
    np.testing.assert_allclose(text, pair.sfm_out[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(audio, pair.sfm_out[1], rtol=0, atol=1e-5)

    loss_mask = np.asarray(tokens) >= 0
    loss_mask[:, 1 + cfg.n_q :] = False
    grads = {}
    for name, m in (("stacked", pair.model), ("per_layer", model)):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)
        assert not jax.tree.leaves(rest)
        loss, g = _loss_grads(graphdef, params, tokens, jnp.asarray(loss_mask))
        grads[name] = (float(loss), sfm_to_torch(g, m.cfg))
    assert grads["per_layer"][0] == pytest.approx(grads["stacked"][0], rel=1e-6)
    for key, ref in grads["stacked"][1].items():
        assert np.abs(ref).max() > 0, key  # every tensor gets a gradient
        np.testing.assert_allclose(
            grads["per_layer"][1][key], ref, rtol=1e-4, atol=1e-7, err_msg=key
        )


def test_kwargs_round_trip(pair: Pair) -> None:
    kwargs = moshi_lm_kwargs(pair.cfg)
    assert lm_config_from_moshi(kwargs) == pair.cfg
    assert checkpoint_shapes(pair.cfg) == {k: v.shape for k, v in pair.state_dict.items()}


def test_bf16_checkpoint_is_widened(pairs: PairCache, tmp_path: Path) -> None:
    pair = pairs["tiny"]
    bf16 = {k: torch.from_numpy(v).bfloat16() for k, v in pair.state_dict.items()}
    path = tmp_path / "bf16.safetensors"
    save_torch_file(bf16, str(path))
    model = import_moshi_lm(path, pair.cfg)
    back = sfm_to_torch(model, pair.cfg)
    for key, value in bf16.items():
        np.testing.assert_array_equal(back[key], value.float().numpy(), err_msg=key)


def test_moshi_7b_config() -> None:
    """Moshi's released config maps to sfm's default config, with the same parameters."""
    cfg = lm_config_from_moshi(loaders._lm_kwargs)
    assert cfg == LMConfig()
    assert param_count(cfg) == MOSHI_7B_PARAMS
    meta = loaders.get_moshi_lm(None, device="meta")
    assert checkpoint_shapes(cfg) == {k: tuple(v.shape) for k, v in meta.state_dict().items()}


# ---- unsupported configs and bad checkpoints ---------------------------------------------------


_BASES = {"moshi_test": MOSHI_TEST_KWARGS, "tiny": TINY}


@pytest.mark.parametrize(
    ("base", "override", "key"),
    [
        ("moshi_test", {}, "depformer_low_rank_embeddings"),  # moshi's own test config
        ("moshi_test", {"depformer_low_rank_embeddings": None}, "gating='none'"),
        ("tiny", {"depformer_weights_per_step_schedule": [0, 1, 1]}, "weights_per_step_sched"),
        ("tiny", {"norm": "layer_norm"}, "norm"),
        ("tiny", {"gating": "none"}, "gating"),
        ("tiny", {"positional_embedding": "sin"}, "positional_embedding"),
        ("tiny", {"depformer_multi_linear": False}, "depformer_multi_linear"),
        ("tiny", {"depformer_weights_per_step": False}, "depformer_weights_per_step"),
        ("tiny", {"layer_scale": 0.01}, "layer_scale"),
        ("tiny", {"depformer_layer_scale": 0.01}, "depformer_layer_scale"),
        ("tiny", {"num_heads": 2, "kv_repeat": 3}, "kv_repeat"),
        ("tiny", {"depformer_pos_emb": "sin"}, "depformer_pos_emb"),
        ("tiny", {"text_card_out": 50}, "text_card_out"),
        ("tiny", {"demux_second_text_stream": True}, "demux_second_text_stream"),
        ("tiny", {"conditioners": {"description": {}}}, "conditioners"),
        ("tiny", {"n_q": 7, "delays": [0] * 8}, "n_q"),
        ("tiny", {"frobnicate": 1}, "frobnicate"),
    ],
)
def test_unsupported_options(base: str, override: dict[str, Any], key: str) -> None:
    with pytest.raises(InteropError, match=key):
        lm_config_from_moshi(dict(_BASES[base], **override))


def test_missing_key(pairs: PairCache, tmp_path: Path) -> None:
    pair = pairs["tiny"]
    key = "depformer.layers.1.gating.2.linear_out.weight"
    with pytest.raises(InteropError, match=f"missing key {key}"):
        import_moshi_lm({k: v for k, v in pair.state_dict.items() if k != key}, pair.cfg)


def test_unexpected_and_misshapen_keys(pairs: PairCache) -> None:
    pair = pairs["tiny"]
    extra = dict(pair.state_dict, **{"extra_heads.0.weight": np.zeros((6, 16), np.float32)})
    with pytest.raises(InteropError, match="unexpected keys.*extra_heads.0.weight"):
        torch_to_sfm(extra, pair.cfg)
    bad = dict(pair.state_dict, **{"linears.1.weight": np.zeros((31, 16), np.float32)})
    with pytest.raises(InteropError, match=r"linears.1.weight has shape \(31, 16\)"):
        torch_to_sfm(bad, pair.cfg)


def test_truncated_checkpoint(pairs: PairCache, tmp_path: Path) -> None:
    data = pairs["tiny"].checkpoint.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{path}: not a readable safetensors file"):
        import_moshi_lm(path, pairs["tiny"].cfg)
