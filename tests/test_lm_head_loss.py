"""The training loss without materialised logits equals the loss of the logits.

`head_cross_entropy` against cross-entropy on explicit logits (values, metrics, gradients for
inputs, kernels and weights), and `heads_loss` against `lm_loss` (logits of the
forward pass) for the Moshi depformer, the CSM decoder with amortization and LoRA on heads.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfm.config import load_config
from sfm.lm import loss as lm_losses
from sfm.lm.config import LMConfig
from sfm.lm.head_loss import head_cross_entropy
from sfm.lm.layout import INITIAL
from sfm.lm.lora import apply_lora
from sfm.lm.loss import cross_entropy, lm_loss
from sfm.lm.model import LM

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "lm"
CSM = ("lm.depth.kind=csm", "lm.depth.max_period=10000.0", "lm.depth.amortize_every=4")
B, T = 2, 12


def logits_loss(x: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array):
    ce, ok = cross_entropy(jnp.einsum("kni,kvi->knv", x, kernel), targets)
    return jnp.sum(weights * ce), (ce, ok)


def heads_loss(x: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array):
    out = head_cross_entropy(x, kernel, targets, weights)
    return out.loss, (out.ce_kn, out.correct_kn)


@pytest.mark.parametrize("k, n, vocab, dim", [(1, 30, 97, 16), (4, 25, 64, 8)])
def test_head_cross_entropy_matches_logits(k: int, n: int, vocab: int, dim: int) -> None:
    keys = jax.random.split(jax.random.key(k), 4)
    x = jax.random.normal(keys[0], (k, n, dim))
    kernel = jax.random.normal(keys[1], (k, vocab, dim))
    targets = jax.random.randint(keys[2], (k, n), -2, vocab)  # with -1 / -2 fillers
    argmax = jnp.argmax(jnp.einsum("kni,kvi->knv", x, kernel), -1)
    targets = jnp.where(jnp.arange(n) % 3 == 0, argmax, targets)  # some predicted right
    weights = jax.random.uniform(keys[3], (k, n)) * (targets >= 0)
    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 3), has_aux=True))
    (ref, (ce_ref, ok_ref)), g_ref = grad(logits_loss)(x, kernel, targets, weights)
    (loss, (ce, ok)), g = grad(heads_loss)(x, kernel, targets, weights)
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    np.testing.assert_allclose(ce, ce_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ok, ok_ref)
    assert np.asarray(ok).any() and not np.asarray(ok)[np.asarray(targets) < 0].any()
    for name, a, b in zip(("x", "kernel", "weights"), g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    # without differentiation: the same values
    plain = jax.jit(heads_loss)(x, kernel, targets, weights)
    np.testing.assert_allclose(plain[0], ref, rtol=1e-6)
    # the cotangent scales the gradients (here through a factor on the loss)
    scaled = lambda x, w, wt: 3.0 * heads_loss(x, w, targets, wt)[0]
    for a, b in zip(jax.grad(scaled, argnums=(0, 1, 2))(x, kernel, weights), g):
        np.testing.assert_allclose(a, 3.0 * b, rtol=1e-6)


def test_head_cross_entropy_metrics_carry_no_gradient() -> None:
    x, kernel = jnp.ones((1, 3, 4)), jnp.ones((1, 5, 4))
    targets, weights = jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3))
    g = jax.grad(lambda x: heads_loss(x, kernel, targets, weights)[1][0].sum())(x)
    assert not np.asarray(g).any()


def test_head_cross_entropy_keeps_dtypes() -> None:
    x = jnp.ones((2, 3, 4), jnp.bfloat16)
    kernel = jnp.ones((2, 5, 4), jnp.bfloat16)
    targets, weights = jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3))
    (loss, (ce, _)), (gx, gk) = jax.value_and_grad(heads_loss, (0, 1), has_aux=True)(
        x, kernel, targets, weights
    )
    assert loss.dtype == ce.dtype == jnp.float32
    assert gx.dtype == gk.dtype == jnp.bfloat16
    np.testing.assert_allclose(ce, np.log(5.0), rtol=1e-6)  # equal logits: ce = log(vocab)


def test_head_cross_entropy_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[K, N, in\]"):
        head_cross_entropy(jnp.ones((3, 4)), jnp.ones((1, 5, 4)), jnp.zeros(3), jnp.ones(3))


# --- the LM's training loss -------------------------------------------------------------------


def tiny(*overrides: str) -> LMConfig:
    return load_config(CONFIGS / "tiny.yaml", list(overrides)).lm


def batch_for(cfg: LMConfig, seed: int) -> dict[str, jax.Array]:
    """Valid tokens with INITIAL before each delay; a mask with gaps on every stream."""
    rng = np.random.default_rng(seed)
    vocab = np.array([cfg.text_card] + [cfg.card] * cfg.n_audio)[:, None]
    tokens = (rng.random((B, cfg.n_streams, T)) * vocab).astype(np.int32)
    tokens[:, 0][rng.random((B, T)) < 0.4] = cfg.text_pad
    for s, d in enumerate(cfg.delays):
        tokens[:, s, :d] = INITIAL
    mask = (tokens >= 0) & (rng.random(tokens.shape) < 0.8)
    mask[:, 1 + cfg.n_q :] = False
    return {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}


def both_losses(model: LM, batch: dict[str, jax.Array], rng: jax.Array | None) -> tuple:
    """(loss, metrics, grads) of heads_loss and of lm_loss on the logits, same rng."""
    graphdef, params = nnx.split(model)

    def via_logits(p: nnx.State) -> tuple:
        m = nnx.merge(graphdef, p)
        return lm_loss(m(batch["tokens"], rng=rng), batch["tokens"], batch["mask"], m.cfg)

    def via_heads(p: nnx.State) -> tuple:
        m = nnx.merge(graphdef, p)
        heads = m.head_inputs(batch["tokens"], rng=rng)
        return lm_losses.heads_loss(heads, batch["tokens"], batch["mask"], m.cfg)

    grad = lambda f: jax.jit(jax.value_and_grad(f, has_aux=True))
    return grad(via_heads)(params), grad(via_logits)(params)


@pytest.mark.parametrize(
    "overrides, lora",
    [((), None), (CSM, None), ((), ("text_linear", "depth.linears")), (CSM, ("head0", "heads"))],
    ids=["moshi", "csm-amortized", "moshi-lora-heads", "csm-lora-heads"],
)
def test_training_loss_equals_loss_of_logits(overrides: tuple, lora: tuple | None) -> None:
    model = LM(tiny(*overrides), rngs=nnx.Rngs(0))
    if lora is not None:
        apply_lora(model, 2, 0.5, targets=lora)
        for path, leaf in nnx.to_flat_state(nnx.state(model)):  # non-zero adapters
            if path[-1] == "lora_b":
                leaf[...] = jax.random.normal(jax.random.key(len(path)), leaf[...].shape)
    batch = batch_for(model.cfg, 0)
    rng = jax.random.key(3) if overrides else None
    ((loss, metrics), grads), ((ref, ref_metrics), ref_grads) = both_losses(model, batch, rng)
    assert float(ref) > 0
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert set(metrics) == set(ref_metrics)
    for name in metrics:
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, err_msg=name)
    if overrides:  # amortization: codebooks >= 1 scored on a quarter of the frames
        assert float(metrics["cb1_count"]) < float(metrics["cb0_count"]) / 2
    flat = dict(nnx.to_flat_state(grads))
    for path, g_ref in nnx.to_flat_state(ref_grads):
        a, b = np.asarray(flat[path][...]), np.asarray(g_ref[...])
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(path))
    assert any(np.abs(g[...]).sum() > 0 for _, g in nnx.to_flat_state(grads))
