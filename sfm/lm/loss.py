"""Weighted cross-entropy of the LM over the text stream and the model's codebooks.

Normalised as in Moshi fine-tuning: the text term is sum(w * ce) / sum(w) over the text
stream, the audio term the same over the predicted codebooks, and the loss is their sum.
Weights: the loss mask, times `loss.text_pad` where the text target is the padding token,
times `loss.semantic` on codebook 0 and `loss.acoustic` on the others (whose frames are also
limited to `depth_mask` when the depth decoder ran on a subset of frames). Because each term
is normalised by its own weights, `loss.text` scales the normalised text term.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sfm.lm.config import LMConfig
from sfm.lm.model import LMOutput

Metrics = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position float32 cross-entropy and correctness (argmax == target), both [...]
    for logits [..., vocab] and targets [...].

    ce = logsumexp(logits) - logits[target], without a full log-softmax array. Targets
    outside [0, vocab) (the -1 / -2 fillers) give a finite value; mask them out."""
    x = logits.astype(jnp.float32)
    safe = jnp.clip(targets, 0, logits.shape[-1] - 1)
    picked = jnp.take_along_axis(x, safe[..., None], axis=-1)[..., 0]
    ce = jax.nn.logsumexp(x, axis=-1) - picked
    return ce, jnp.argmax(x, axis=-1) == targets


def _normalised(ce: jax.Array, w: jax.Array) -> jax.Array:
    """sum(w * ce) / sum(w), 0 when no weight."""
    den = w.sum()
    return jnp.where(den > 0, (w * ce).sum() / jnp.where(den > 0, den, 1.0), 0.0)


def _stream_metrics(name: str, ce: jax.Array, ok: jax.Array, m: jax.Array) -> Metrics:
    """Unweighted mean CE and accuracy over the masked positions, and their count."""
    count = m.sum()
    safe = jnp.maximum(count, 1.0)
    return {
        f"{name}_ce": (ce * m).sum() / safe,
        f"{name}_acc": (ok * m).sum() / safe,
        f"{name}_count": count,
    }


def _audio_mask(out: LMOutput, mask_bst: jax.Array, dep_q: int) -> jax.Array:
    """[B, T, dep_q] loss mask of the model's codebooks, limited to depth_mask for k >= 1."""
    m = jnp.moveaxis(mask_bst[:, 1 : 1 + dep_q], 1, 2).astype(jnp.float32)
    if out.depth_mask is None:
        return m
    depth = out.depth_mask.astype(jnp.float32)[..., None]
    keep = jnp.concatenate([jnp.ones_like(depth), jnp.repeat(depth, dep_q - 1, axis=-1)], -1)
    return m * keep


def lm_loss(
    out: LMOutput, tokens_bst: jax.Array, mask_bst: jax.Array, cfg: LMConfig
) -> tuple[jax.Array, Metrics]:
    """(loss, metrics) for delayed tokens and loss mask [B, S, T] (see the module doc)."""
    k, lw = cfg.dep_q, cfg.loss
    text_t = tokens_bst[:, 0]
    text_m = mask_bst[:, 0].astype(jnp.float32)
    audio_t = jnp.moveaxis(tokens_bst[:, 1 : 1 + k], 1, 2)  # [B, T, K]
    audio_m = _audio_mask(out, mask_bst, k)
    text_ce, text_ok = cross_entropy(out.text_logits, text_t)
    audio_ce, audio_ok = cross_entropy(out.audio_logits, audio_t)

    text_w = text_m * jnp.where(text_t == cfg.text_pad, lw.text_pad, 1.0)
    per_cb = jnp.asarray([lw.semantic] + [lw.acoustic] * (k - 1), jnp.float32)
    text_loss = _normalised(text_ce, text_w)
    audio_loss = _normalised(audio_ce, audio_m * per_cb)
    loss = lw.text * text_loss + audio_loss

    metrics: Metrics = {"loss": loss, "text_loss": text_loss, "audio_loss": audio_loss}
    metrics |= _stream_metrics("text", text_ce, text_ok, text_m)
    for i in range(k):
        metrics |= _stream_metrics(f"cb{i}", audio_ce[..., i], audio_ok[..., i], audio_m[..., i])
    return loss, metrics


def lm_loss_fn(
    model: nnx.Module, batch: dict[str, Any], rng: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
    """Forward pass on batch["tokens"] and lm_loss against batch["mask"] (for nnx.grad)."""
    tokens = jnp.asarray(batch["tokens"])
    out = model(tokens, rng=rng)
    return lm_loss(out, tokens, jnp.asarray(batch["mask"]), model.cfg)


__all__ = ["cross_entropy", "lm_loss", "lm_loss_fn"]
