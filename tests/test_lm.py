"""LM: parameter counts, config checks, causality, loss, CSM amortization, remat, LoRA, training."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sfm.config import ConfigError, load_config
from sfm.lm.config import LMConfig
from sfm.lm.layers import LayerStack, StepLinear
from sfm.lm.layout import INITIAL, StreamLayout, crop_or_pad, delay_streams, to_streams
from sfm.lm.lora import LoRAParam, apply_lora, merge_lora
from sfm.lm.loss import cross_entropy, lm_loss, lm_loss_fn
from sfm.lm.model import LM, LMOutput, param_count

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "lm"
CSM = ("lm.depth.kind=csm", "lm.depth.max_period=10000.0", "lm.depth.amortize_every=4")
B, T = 2, 8
Batch = dict[str, np.ndarray]


def tiny(*overrides: str) -> LMConfig:
    return load_config(CONFIGS / "tiny.yaml", list(overrides)).lm


@pytest.fixture(scope="module")
def moshi() -> LM:
    return LM(tiny(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def csm() -> LM:
    return LM(tiny(*CSM), rngs=nnx.Rngs(0))


@nnx.jit
def forward(model: LM, tokens: jax.Array, rng: jax.Array | None = None) -> tuple:
    out = model(tokens, rng=rng)
    return out.text_logits, out.audio_logits, out.depth_mask


@nnx.jit
def loss_and_grads(model: LM, batch: Batch) -> tuple[jax.Array, nnx.State]:
    (loss, _), grads = nnx.value_and_grad(lm_loss_fn, has_aux=True)(model, batch)
    return loss, grads


def random_tokens(cfg: LMConfig, seed: int) -> jax.Array:
    """[B, S, T] valid tokens on every stream, INITIAL before each stream's delay."""
    rng = np.random.default_rng(seed)
    vocab = np.array([cfg.text_card] + [cfg.card] * cfg.n_audio)[:, None]
    tokens = (rng.random((B, cfg.n_streams, T)) * vocab).astype(np.int32)
    for s, d in enumerate(cfg.delays):
        tokens[:, s, :d] = INITIAL
    return jnp.asarray(tokens)


def layout_batch(cfg: LMConfig, seed: int) -> Batch:
    """A batch as the data pipeline makes it: mono items, delayed, padded (-2 / -1 fillers)."""
    rng = np.random.default_rng(seed)
    layout = StreamLayout(n_q=cfg.n_q, delays=cfg.delays)
    items = []
    for length in (T - 1, T - 3):
        text = rng.integers(0, cfg.text_card, (1, length))
        text[rng.random((1, length)) < 0.4] = cfg.text_pad
        record = {"codes": rng.integers(0, cfg.card, (1, cfg.n_q, length)), "text": text}
        tokens, mask = delay_streams(*to_streams(record, layout), layout)
        items.append(crop_or_pad(tokens, mask, T, layout.ignore, 0))
    return {k: np.stack([item[k] for item in items]) for k in ("tokens", "mask")}


# --- parameter counts -------------------------------------------------------------------------


def stack_params(layers: int, steps: int, dim: int, heads: int, kv: int | None, ff: int) -> int:
    """Pre-norm layers: two norms, fused qkv, out proj, gated MLP (hidden 2/3 ff) per step."""
    head_dim, hidden = dim // heads, 2 * ff // 3
    per_step = (heads + 2 * (kv or heads)) * head_dim * dim + dim * dim + 3 * hidden * dim
    return layers * (2 * dim + steps * per_step)


def expected_params(c: LMConfig) -> int:
    t, d = c.temporal, c.depth
    n = (c.text_card + 1 + 2 * c.n_q * (c.card + 1)) * t.dim  # embeddings + initial rows
    n += stack_params(t.num_layers, 1, t.dim, t.num_heads, t.num_kv_heads, t.dim_feedforward)
    n += t.dim + c.text_card * t.dim  # out norm, text head
    depth = stack_params(d.num_layers, 1, d.dim, d.num_heads, d.num_kv_heads, d.dim_feedforward)
    if d.kind == "moshi":  # per-step in proj, text + K - 1 embeddings, per-step layers, heads
        depth = stack_params(
            d.num_layers, c.dep_q, d.dim, d.num_heads, d.num_kv_heads, d.dim_feedforward
        )
        depth += c.dep_q * t.dim * d.dim + (c.text_card + 1 + (c.dep_q - 1) * (c.card + 1)) * d.dim
        return n + depth + c.dep_q * c.card * d.dim
    # csm: codebook-0 head, in proj, shared layers, heads for codebooks 1..K-1
    return n + c.card * t.dim + t.dim * d.dim + depth + (c.dep_q - 1) * c.card * d.dim


@pytest.mark.parametrize("name", ["moshi_7b", "csm_1b", "small", "tiny"])
def test_param_count(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml", []).lm
    count = param_count(cfg)
    print(f"{name}: {count:,} parameters")
    assert count == expected_params(cfg)
    if name == "moshi_7b":
        assert count == 7_687_729_152


# --- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["lm.delays=[0, 0, 1]"], "lm.delays"),
        (["lm.delays=[0, 0, 1, 1, 1, 0, 1, 1, -1]"], "lm.delays"),
        (["lm.dep_q=0"], "lm.dep_q"),
        (["lm.dep_q=5"], "lm.dep_q"),
        (["lm.temporal.num_heads=5"], "lm.temporal.num_heads"),
        (["lm.depth.num_kv_heads=3"], "lm.depth.num_heads"),
        (["lm.depth.kind=transformer"], "lm.depth.kind"),
        (["lm.depth.amortize_every=0"], "lm.depth.amortize_every"),
        (["lm.depth.kind=csm", "lm.dep_q=1"], "lm.dep_q"),
        (["lm.temporal.remat=some"], "lm.temporal.remat"),
        (["lm.temporal.scan_unroll=0"], "lm.temporal.scan_unroll"),
        (["lm.depth.scan_unroll=-2"], "lm.depth.scan_unroll"),
        (["lm.depth.scan_unroll=all"], "lm.depth.scan_unroll"),
        (["lm.depth.scan_layers=false", "lm.depth.scan_unroll=true"], "lm.depth.scan_unroll"),
        (["lm.temporal.dimm=64"], "lm.temporal.dimm"),
        (["lm.card=many"], "lm.card"),
    ],
)
def test_bad_config_names_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.yaml", overrides)
    assert str(err.value).startswith(f"{key}:"), str(err.value)


def test_tiny_config() -> None:
    cfg = tiny()
    assert (cfg.n_streams, cfg.dep_q, cfg.max_delay, cfg.text_pad) == (9, 4, 1, 3)
    assert tiny(*CSM).depth.kind == "csm"
    unrolled = tiny("lm.temporal.scan_unroll=true", "lm.depth.scan_unroll=2")
    assert unrolled.temporal.scan_unroll is True and unrolled.depth.scan_unroll == 2
    assert cfg.temporal.scan_unroll is False and cfg.depth.scan_unroll is False
    per_layer = tiny("lm.temporal.scan_layers=false")
    assert not per_layer.temporal.scan_layers and cfg.temporal.scan_layers


# --- layers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [(0, 1, 2, 3), (1, 2, 3), (3, 0, 2), (2,)])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
def test_step_linear_matches_per_position_products(steps: tuple[int, ...], lead: tuple) -> None:
    """x [..., T, in] -> y[..., t] = x[..., t] @ W[steps[t]].T (+ the LoRA term per step)."""
    lin = StepLinear(6, 10, n_weights=4, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(len(steps) + len(lead))
    x = rng.normal(size=(*lead, len(steps), 6)).astype(np.float32)
    w = np.asarray(lin.kernel[...], np.float64)
    expected = np.stack([x[..., t, :] @ w[s].T for t, s in enumerate(steps)], axis=-2)
    np.testing.assert_allclose(lin(jnp.asarray(x), steps), expected, rtol=1e-5, atol=1e-5)
    a = rng.normal(size=(4, 3, 6)).astype(np.float32)
    b = rng.normal(size=(4, 10, 3)).astype(np.float32)
    lin.lora_a, lin.lora_b, lin.lora_scaling = LoRAParam(a), LoRAParam(b), 0.5
    expected += np.stack(
        [0.5 * x[..., t, :] @ a[s].T.astype(np.float64) @ b[s].T for t, s in enumerate(steps)],
        axis=-2,
    )
    np.testing.assert_allclose(lin(jnp.asarray(x), steps), expected, rtol=1e-5, atol=1e-5)


def test_scan_unroll_gives_the_same_outputs_and_gradients() -> None:
    """LayerStack's scan, rolled or unrolled (fully or by 2 of 3 layers): same values."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 16)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (4, 3))
    kw = dict(dim=16, num_heads=2, kv_heads=2, hidden=24, context=None, max_period=None)
    results = []
    for unroll in (False, True, 2):
        stack = LayerStack(
            3, scan_unroll=unroll, rngs=nnx.Rngs(0), norm_eps=1e-5, n_weights=3, **kw
        )
        loss = lambda m, x: jnp.sum(jnp.sin(m(x, pos, (0, 1, 2))))
        results.append(nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(stack, x))
    (value, grads), *others = results
    for other_value, other_grads in others:
        np.testing.assert_allclose(other_value, value, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(other_grads), jax.tree.leaves(grads)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- causality --------------------------------------------------------------------------------


def changed_logits(model: LM, stream: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Which text logits [B, T] and audio logits [B, T, K] change when (stream, frame t) does."""
    cfg = model.cfg
    tokens = random_tokens(cfg, 0)
    vocab = cfg.text_card if stream == 0 else cfg.card
    other = tokens.at[:, stream, t].set((tokens[:, stream, t] + 1) % vocab)
    (text_a, audio_a, _), (text_b, audio_b, _) = forward(model, tokens), forward(model, other)
    differs = lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(-1) > 1e-6
    return differs(text_a, text_b), differs(audio_a, audio_b)


@pytest.mark.parametrize("kind", ["moshi", "csm"])
def test_causality(kind: str, request: pytest.FixtureRequest) -> None:
    """Frame t changes only later frames, and the depth logits at t of later codebooks.

    Moshi's depformer reads the text then codebooks 0..K-2 of the frame; CSM's decoder reads
    codebooks 0..K-2 (not the text); neither reads the user's streams of the frame."""
    model = request.getfixturevalue(kind)
    k, t = model.cfg.dep_q, 4
    streams = {0: "text", 1: "cb0", 2: "cb1", k: f"cb{k - 1}", k + 1: "user0", 2 * k: "user_last"}
    for stream, name in streams.items():
        text, audio = changed_logits(model, stream, t)
        assert not text[:, : t + 1].any() and not audio[:, :t].any(), name
        assert text[:, t + 1 :].all() and audio[:, t + 1 :].all(), name
        if stream == 0:
            expected = np.full(k, kind == "moshi")
        elif stream <= k:
            expected = np.arange(k) > stream - 1  # codebook j = stream - 1
        else:
            expected = np.zeros(k, bool)
        np.testing.assert_array_equal(audio[:, t], np.broadcast_to(expected, (B, k)), name)


# --- loss -------------------------------------------------------------------------------------


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def loss_example(seed: int, vt: int = 7, card: int = 5) -> tuple[LMOutput, np.ndarray, np.ndarray]:
    """Random logits, targets (pads and -1 / -2 fillers) and a mask with holes."""
    rng = np.random.default_rng(seed)
    cfg = tiny()
    tokens = np.full((B, cfg.n_streams, T), -1, np.int32)
    tokens[:, 0] = rng.integers(0, vt, (B, T))
    tokens[:, 0, ::3] = cfg.text_pad
    tokens[:, 1 : 1 + cfg.n_q] = rng.integers(0, card, (B, cfg.n_q, T))
    mask = rng.random(tokens.shape) < 0.7
    mask[:, 1 + cfg.n_q :] = False
    tokens[:, 2:5, 0] = INITIAL
    mask[:, 2:5, 0] = False
    out = LMOutput(
        jnp.asarray(rng.normal(size=(B, T, vt)) * 2, jnp.float32),
        jnp.asarray(rng.normal(size=(B, T, cfg.dep_q, card)) * 2, jnp.float32),
    )
    return out, tokens, mask


def hand_loss(out: LMOutput, tokens: np.ndarray, mask: np.ndarray, cfg: LMConfig) -> dict:
    """The loss written out position by position."""
    text_lp, audio_lp = log_softmax(np.asarray(out.text_logits)), log_softmax(out.audio_logits)
    tn = td = an = ad = 0.0
    for b in range(B):
        for t in range(T):
            if mask[b, 0, t]:
                w = cfg.loss.text_pad if tokens[b, 0, t] == cfg.text_pad else 1.0
                tn, td = tn - w * text_lp[b, t, tokens[b, 0, t]], td + w
            for k in range(cfg.dep_q):
                if mask[b, 1 + k, t]:
                    w = cfg.loss.semantic if k == 0 else cfg.loss.acoustic
                    an, ad = an - w * audio_lp[b, t, k, tokens[b, 1 + k, t]], ad + w
    return {"text_loss": tn / td, "audio_loss": an / ad, "loss": tn / td + an / ad}


def log_softmax_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple:
    """The straightforward form: the target's entry of a full float32 log-softmax."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.clip(targets, 0, logits.shape[-1] - 1)
    ce = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return ce, jnp.argmax(logp, axis=-1) == targets


@pytest.mark.parametrize("shape, vocab", [((2, 9, 4), 2048), ((3, 11), 4000), ((5,), 7)])
def test_cross_entropy_matches_log_softmax(shape: tuple[int, ...], vocab: int) -> None:
    """logsumexp - target logit == -log_softmax[target]: values, accuracy, masked means and
    their gradients, with -1 / -2 filler targets masked out."""
    rng = np.random.default_rng(vocab)
    logits = jnp.asarray(rng.normal(size=(*shape, vocab)) * 3 + 5, jnp.float32)
    targets = jnp.asarray(rng.integers(-2, vocab, shape), jnp.int32)
    targets = targets.at[..., 0].set(jnp.argmax(logits[..., 0, :], axis=-1))  # some correct
    w = jnp.asarray(rng.random(shape) < 0.7, jnp.float32) * (targets >= 0)

    def weighted(fn: Any, x: jax.Array) -> tuple[jax.Array, tuple]:
        ce, ok = fn(x, targets)
        return (w * ce).sum() / w.sum(), (ce, ok)

    new = jax.jit(jax.value_and_grad(lambda x: weighted(cross_entropy, x), has_aux=True))
    ref = jax.jit(
        jax.value_and_grad(lambda x: weighted(log_softmax_cross_entropy, x), has_aux=True)
    )
    (mean, (ce, ok)), grad = new(logits)
    (mean_ref, (ce_ref, ok_ref)), grad_ref = ref(logits)
    valid = np.asarray(targets) >= 0
    np.testing.assert_allclose(np.asarray(ce)[valid], np.asarray(ce_ref)[valid], 1e-6, 1e-6)
    assert np.isfinite(np.asarray(ce)).all()
    np.testing.assert_array_equal(ok, ok_ref)
    assert np.asarray(ok).any() and not np.asarray(ok)[~valid].any()
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-6, atol=1e-6)


def test_loss_matches_hand_computation() -> None:
    cfg = tiny()
    out, tokens, mask = loss_example(0)
    jitted = jax.jit(lambda a, b, tok, m: lm_loss(LMOutput(a, b), tok, m, cfg))
    loss, metrics = jitted(out.text_logits, out.audio_logits, tokens, mask)
    expected = hand_loss(out, tokens, mask, cfg)
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(loss, expected["loss"], rtol=1e-5)
    # unweighted per-stream metrics
    lp = log_softmax(np.asarray(out.audio_logits))[..., 0, :]
    m0, tgt = mask[:, 1], tokens[:, 1]
    ce0 = -np.take_along_axis(lp, np.maximum(tgt, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(metrics["cb0_ce"], ce0[m0].mean(), rtol=1e-5)
    acc0 = (np.asarray(out.audio_logits)[..., 0, :].argmax(-1) == tgt)[m0].mean()
    np.testing.assert_allclose(metrics["cb0_acc"], acc0, rtol=1e-6)
    assert metrics["cb0_count"] == m0.sum() and metrics["text_count"] == mask[:, 0].sum()
    assert set(metrics) >= {f"cb{k}_{m}" for k in range(4) for m in ("ce", "acc", "count")}


def test_text_pad_weight() -> None:
    """Padding targets count text_pad times as much as word tokens in the text term."""
    out, tokens, mask = loss_example(1)
    mask[:] = True
    lp = log_softmax(np.asarray(out.text_logits))
    ce = -np.take_along_axis(lp, tokens[:, 0, :, None], -1)[..., 0]
    pad = tokens[:, 0] == 3
    for weight in (0.0, 0.5, 1.0):
        cfg = tiny(f"lm.loss.text_pad={weight}")
        _, metrics = lm_loss(out, tokens, mask, cfg)
        expected = (weight * ce[pad].sum() + ce[~pad].sum()) / (weight * pad.sum() + (~pad).sum())
        np.testing.assert_allclose(metrics["text_loss"], expected, rtol=1e-5)
    assert 0 < pad.sum() < pad.size


def test_semantic_weight() -> None:
    """Codebook 0 counts `semantic` times, the others `acoustic` times, in the audio term."""
    out, tokens, mask = loss_example(2)
    lp = log_softmax(np.asarray(out.audio_logits))
    tgt = np.moveaxis(np.maximum(tokens[:, 1:5], 0), 1, 2)
    ce = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
    m = np.moveaxis(mask[:, 1:5], 1, 2)
    for semantic in (100.0, 1.0):
        _, metrics = lm_loss(out, tokens, mask, tiny(f"lm.loss.semantic={semantic}"))
        num = semantic * ce[..., 0][m[..., 0]].sum() + ce[..., 1:][m[..., 1:]].sum()
        expected = num / (semantic * m[..., 0].sum() + m[..., 1:].sum())
        np.testing.assert_allclose(metrics["audio_loss"], expected, rtol=1e-5)


def test_masked_positions_do_not_contribute() -> None:
    cfg = tiny()
    out, tokens, mask = loss_example(3)
    loss, metrics = lm_loss(out, tokens, mask, cfg)
    rng = np.random.default_rng(0)
    tokens2 = np.where(mask, tokens, rng.integers(-2, 5, tokens.shape)).astype(np.int32)
    noise = rng.normal(size=out.audio_logits.shape)
    audio_m = np.moveaxis(mask[:, 1:5], 1, 2)[..., None]
    out2 = LMOutput(
        jnp.where(mask[:, 0, :, None], out.text_logits, 9.0),
        jnp.where(audio_m, out.audio_logits, noise),
    )
    loss2, metrics2 = lm_loss(out2, tokens2, mask, cfg)
    assert float(loss2) == float(loss)
    for name in metrics:
        np.testing.assert_allclose(metrics2[name], metrics[name], rtol=1e-6, err_msg=name)
    # a changed target at an unmasked position does change it
    tokens2[0, 1, np.flatnonzero(mask[0, 1])[0]] += 1
    assert float(lm_loss(out, tokens2, mask, cfg)[0]) != float(loss)


def test_depth_mask_limits_codebooks_after_the_first() -> None:
    cfg = tiny()
    out, tokens, mask = loss_example(4)
    depth = np.zeros((B, T), bool)
    depth[:, 1::4] = True
    masked = LMOutput(out.text_logits, out.audio_logits, jnp.asarray(depth))
    _, metrics = lm_loss(masked, tokens, mask, cfg)
    assert metrics["cb0_count"] == mask[:, 1].sum()
    assert metrics["cb2_count"] == (mask[:, 3] & depth).sum()
    # logits of codebooks >= 1 outside the marked frames are ignored; codebook 0's are not
    noise = jnp.where(jnp.asarray(depth)[..., None, None], out.audio_logits, 5.0)
    loss_with = lambda audio: float(
        lm_loss(LMOutput(out.text_logits, audio, masked.depth_mask), tokens, mask, cfg)[0]
    )
    assert loss_with(out.audio_logits.at[..., 1:, :].set(noise[..., 1:, :])) == metrics["loss"]
    assert loss_with(out.audio_logits.at[..., 0, :].set(noise[..., 0, :])) != metrics["loss"]


def test_gradients_finite(moshi: LM) -> None:
    batch = layout_batch(moshi.cfg, 0)
    assert (batch["tokens"] == INITIAL).any() and (batch["tokens"] == -1).any()
    loss, grads = loss_and_grads(moshi, batch)
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
    empty = {**batch, "mask": np.zeros_like(batch["mask"])}  # no weight at all: loss 0
    loss0, grads0 = loss_and_grads(moshi, empty)
    assert float(loss0) == 0 and all(
        np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads0)
    )


# --- CSM amortization -------------------------------------------------------------------------


def test_csm_amortization(csm: LM) -> None:
    tokens = random_tokens(csm.cfg, 0)
    text_full, audio_full, none = forward(csm, tokens)
    assert none is None
    text, audio, depth = forward(csm, tokens, jax.random.key(0))
    depth = np.asarray(depth)
    assert depth.shape == (B, T) and (depth.sum(1) == T // 4).all()
    np.testing.assert_allclose(text, text_full, atol=1e-5)
    np.testing.assert_allclose(audio[:, :, 0], audio_full[:, :, 0], atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(audio)[depth][:, 1:], np.asarray(audio_full)[depth][:, 1:], atol=1e-5
    )
    masks = {np.asarray(forward(csm, tokens, jax.random.key(s))[2]).tobytes() for s in range(4)}
    assert len(masks) > 1  # the frames are drawn at random
    ones = np.ones((B, csm.cfg.n_streams, T), bool)
    _, metrics = lm_loss(LMOutput(text, audio, jnp.asarray(depth)), tokens, ones, csm.cfg)
    assert metrics["cb0_count"] == B * T and metrics["cb1_count"] == B * (T // 4)


# --- remat ------------------------------------------------------------------------------------


def grad_jaxpr(model: LM, batch: Batch) -> str:
    graphdef, state = nnx.split(model)
    loss = lambda st: lm_loss_fn(nnx.merge(graphdef, st), batch)[0]
    return str(jax.make_jaxpr(jax.grad(loss))(state))


def test_remat_policies_agree() -> None:
    batch = layout_batch(tiny(), 1)
    results = {}
    for remat in ("none", "full", "dots"):
        model = LM(tiny(f"lm.temporal.remat={remat}"), rngs=nnx.Rngs(0))
        rematted = re.search(r"= (remat\d*|checkpoint)\[", grad_jaxpr(model, batch))
        assert (rematted is not None) == (remat != "none"), remat
        results[remat] = loss_and_grads(model, batch)
    loss, grads = results["none"]
    for remat in ("full", "dots"):
        np.testing.assert_allclose(results[remat][0], loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(results[remat][1]), jax.tree.leaves(grads)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# --- LoRA -------------------------------------------------------------------------------------


def test_lora_apply_and_merge() -> None:
    model = LM(tiny(), rngs=nnx.Rngs(0))
    tokens = random_tokens(model.cfg, 0)
    base = forward(model, tokens)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    paths = apply_lora(model, 4, 2.0)
    assert len(paths) == 8 and all(
        p.split(".")[-1] in ("in_proj", "out_proj", "linear_in", "linear_out") for p in paths
    )
    for _, a in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        assert a.get_metadata()["out_sharding"][0] == "layers"
    np.testing.assert_array_equal(forward(model, tokens)[1], base[1])  # B = 0: unchanged
    lora = nnx.state(model, LoRAParam)
    rng = np.random.default_rng(1)
    nnx.update(model, jax.tree.map(lambda x: 0.1 * rng.normal(size=x.shape).astype(x.dtype), lora))
    text, audio, _ = forward(model, tokens)
    assert np.abs(np.asarray(audio) - np.asarray(base[1])).max() > 1e-3
    assert np.abs(np.asarray(text) - np.asarray(base[0])).max() > 1e-3
    assert merge_lora(model) == 8
    assert not jax.tree.leaves(nnx.state(model, LoRAParam))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == n_params
    merged = forward(model, tokens)
    np.testing.assert_allclose(merged[0], text, atol=1e-5)
    np.testing.assert_allclose(merged[1], audio, atol=1e-5)


def test_lora_targets() -> None:
    model = LM(tiny(), rngs=nnx.Rngs(0))
    paths = apply_lora(model, 2, 1.0, targets=("depth.transformer.layers.self_attn",))
    assert paths == [
        "depth.transformer.layers.self_attn.in_proj",
        "depth.transformer.layers.self_attn.out_proj",
    ]
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, 2, 1.0, targets=("self_attn",))
    with pytest.raises(ValueError, match="no linear"):
        apply_lora(model, 2, 1.0, targets=("nothing",))
    with pytest.raises(ValueError, match="depformer_in"):
        apply_lora(model, 2, 1.0, targets=("depformer_in",))


def paths(state: nnx.State) -> set[tuple]:
    return {p for p, _ in nnx.to_flat_state(state)}


@nnx.jit
def train_step(model: LM, optimizer: nnx.Optimizer, batch: Batch) -> tuple[jax.Array, nnx.State]:
    diff = nnx.DiffState(0, optimizer.wrt)
    (loss, _), grads = nnx.value_and_grad(lm_loss_fn, argnums=diff, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return loss, grads


def test_lora_trains_only_the_adapters() -> None:
    model = LM(tiny(), rngs=nnx.Rngs(0))
    apply_lora(model, 4, 1.0)
    base = nnx.All(nnx.Param, nnx.Not(LoRAParam))
    before = jax.tree.map(np.array, nnx.state(model, base))
    lora_b = lambda: [
        np.array(v) for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam)) if p[-1] == "lora_b"
    ]
    assert not any(b.any() for b in lora_b())
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=LoRAParam)
    _, grads = train_step(model, optimizer, layout_batch(model.cfg, 0))
    grad_paths = paths(grads)
    assert grad_paths == paths(nnx.state(model, LoRAParam))
    assert grad_paths and not paths(nnx.state(model, base)) & grad_paths
    for a, b in zip(jax.tree.leaves(nnx.state(model, base)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    assert all(b.any() for b in lora_b())


# --- training ---------------------------------------------------------------------------------


@nnx.jit
def apply_update(model: LM, optimizer: nnx.Optimizer, grads: nnx.State) -> None:
    optimizer.update(model, grads)


def test_training_reduces_the_loss() -> None:
    model = LM(tiny(), rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    batch = layout_batch(model.cfg, 2)
    losses = []
    for _ in range(30):
        loss, grads = loss_and_grads(model, batch)
        apply_update(model, optimizer, grads)
        losses.append(float(loss))
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.6 * losses[0] and np.isfinite(losses).all()
