"""Weighted cross-entropy of the LM over the text stream and the model's codebooks.

Normalised as in Moshi fine-tuning: the text term is sum(w * ce) / sum(w) over the text
stream, the audio term the same over the predicted codebooks, and the loss is their sum.
Weights: the loss mask, times `loss.text_pad` where the text target is the padding token,
times `loss.semantic` on codebook 0 and `loss.acoustic` on the others (whose frames are also
limited to the ones the depth decoder ran on under CSM amortization). Because each term is
normalised by its own weights, `loss.text` scales the normalised text term.

Two ways to the same numbers: `lm_loss` scores the logits of a forward pass (`LMOutput`);
`lm_loss_fn`, the training loss, scores the output heads' inputs with
`sfm.lm.head_loss.head_cross_entropy`, which never keeps the logits for the backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sfm.lm.config import LMConfig
from sfm.lm.head_loss import head_cross_entropy
from sfm.lm.model import Heads, LMHeads, LMOutput

Metrics = dict[str, jax.Array]


class Scored(NamedTuple):
    """Per-position results of a group of heads, step-major [K, rows]."""

    ce: jax.Array
    correct: jax.Array
    mask: jax.Array  # float loss mask
    weight: jax.Array  # mask times the per-token loss weight, before normalisation


class Targets(NamedTuple):
    """Targets, float loss mask and loss weights of a group of heads, step-major [K, rows]."""

    tokens: jax.Array
    mask: jax.Array
    weight: jax.Array


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


def _step_major(x_bkt: jax.Array, frames_bn: jax.Array | None) -> jax.Array:
    """[B, K, T] -> [K, rows] over (b, t), or over (b, j) for frames frames_bn[b, j]."""
    if frames_bn is not None:
        x_bkt = jnp.take_along_axis(x_bkt, frames_bn[:, None, :], axis=2)
    return jnp.moveaxis(x_bkt, 1, 0).reshape(x_bkt.shape[1], -1)


def text_targets(tokens_bst: jax.Array, mask_bst: jax.Array, cfg: LMConfig) -> Targets:
    """The text stream [1, B * T]; padding targets weigh `loss.text_pad`."""
    tokens = _step_major(tokens_bst[:, :1], None)
    mask = _step_major(mask_bst[:, :1], None).astype(jnp.float32)
    return Targets(tokens, mask, mask * jnp.where(tokens == cfg.text_pad, cfg.loss.text_pad, 1.0))


def audio_targets(
    tokens_bst: jax.Array,
    mask_bst: jax.Array,
    cfg: LMConfig,
    codebooks: range,
    frames_bn: jax.Array | None = None,
) -> Targets:
    """The model's `codebooks` [len, rows] on all frames or on `frames_bn`; codebook 0
    weighs `loss.semantic`, the others `loss.acoustic`."""
    streams = slice(1 + codebooks.start, 1 + codebooks.stop)
    tokens = _step_major(tokens_bst[:, streams], frames_bn)
    mask = _step_major(mask_bst[:, streams], frames_bn).astype(jnp.float32)
    lw = cfg.loss
    per_cb = jnp.asarray([lw.semantic if k == 0 else lw.acoustic for k in codebooks])
    return Targets(tokens, mask, mask * per_cb[:, None].astype(jnp.float32))


def _normalised(ce: jax.Array, w: jax.Array) -> jax.Array:
    """sum(w * ce) / sum(w), 0 when no weight."""
    return (w * ce).sum() * _inverse(w.sum())


def _inverse(total: jax.Array) -> jax.Array:
    """1 / total, 0 for a total of 0."""
    return jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)


def _stream_metrics(name: str, ce: jax.Array, ok: jax.Array, m: jax.Array) -> Metrics:
    """Unweighted mean CE and accuracy over the masked positions, and their count."""
    count = m.sum()
    safe = jnp.maximum(count, 1.0)
    return {
        f"{name}_ce": (ce * m).sum() / safe,
        f"{name}_acc": (ok * m).sum() / safe,
        f"{name}_count": count,
    }


def _metrics(text: Scored, audio: Sequence[Scored]) -> Metrics:
    """Normalised text and audio terms and per-stream metrics (codebooks in order)."""
    flat = lambda field: jnp.concatenate([getattr(g, field).reshape(-1) for g in audio])
    metrics: Metrics = {
        "text_loss": _normalised(text.ce, text.weight),
        "audio_loss": _normalised(flat("ce"), flat("weight")),
    }
    metrics |= _stream_metrics("text", text.ce[0], text.correct[0], text.mask[0])
    rows = [(g.ce[i], g.correct[i], g.mask[i]) for g in audio for i in range(g.ce.shape[0])]
    for k, row in enumerate(rows):
        metrics |= _stream_metrics(f"cb{k}", *row)
    return metrics


def lm_loss(
    out: LMOutput, tokens_bst: jax.Array, mask_bst: jax.Array, cfg: LMConfig
) -> tuple[jax.Array, Metrics]:
    """(loss, metrics) of the logits of a forward pass, for delayed tokens and loss mask
    [B, S, T] (see the module doc)."""
    k = cfg.dep_q
    text = text_targets(tokens_bst, mask_bst, cfg)
    audio = audio_targets(tokens_bst, mask_bst, cfg, range(k))
    if out.depth_mask is not None:  # codebooks >= 1 only where the decoder ran
        ran = _step_major(out.depth_mask[:, None], None).astype(jnp.float32)  # [1, B * T]
        keep = jnp.concatenate([jnp.ones_like(ran), jnp.repeat(ran, k - 1, axis=0)])
        audio = Targets(audio.tokens, audio.mask * keep, audio.weight * keep)
    b, t = tokens_bst.shape[0], tokens_bst.shape[2]
    text_logits = out.text_logits.reshape(1, b * t, -1)
    audio_logits = jnp.moveaxis(out.audio_logits, 2, 0).reshape(k, b * t, -1)
    text_s = Scored(*cross_entropy(text_logits, text.tokens), text.mask, text.weight)
    audio_s = Scored(*cross_entropy(audio_logits, audio.tokens), audio.mask, audio.weight)
    metrics = _metrics(text_s, [audio_s])
    loss = cfg.loss.text * metrics["text_loss"] + metrics["audio_loss"]
    return loss, {"loss": loss} | metrics


def heads_loss(
    heads: LMHeads, tokens_bst: jax.Array, mask_bst: jax.Array, cfg: LMConfig
) -> tuple[jax.Array, Metrics]:
    """`lm_loss` of the logits the heads would give, without materialising them for the
    backward pass (sfm.lm.head_loss)."""
    text = text_targets(tokens_bst, mask_bst, cfg)
    audio, first = [], 0
    for group in heads.audio:
        codebooks = range(first, first + group.x_kni.shape[0])
        audio.append(audio_targets(tokens_bst, mask_bst, cfg, codebooks, group.frames_bn))
        first = codebooks.stop
    if first != cfg.dep_q:
        raise ValueError(f"the audio heads cover {first} codebooks, the config {cfg.dep_q}")
    text_scale = cfg.loss.text * _inverse(text.weight.sum())
    audio_scale = _inverse(sum(a.weight.sum() for a in audio))

    def score(group: Heads, targets: Targets, scale: jax.Array) -> tuple[jax.Array, Scored]:
        weight = targets.weight * scale
        out = head_cross_entropy(group.x_kni, group.kernel_kvi, targets.tokens, weight)
        return out.loss, Scored(out.ce_kn, out.correct_kn, targets.mask, targets.weight)

    text_loss, text_s = score(heads.text, text, text_scale)
    audio_parts = [score(g, a, audio_scale) for g, a in zip(heads.audio, audio)]
    loss = text_loss + sum(part for part, _ in audio_parts)
    return loss, {"loss": loss} | _metrics(text_s, [s for _, s in audio_parts])


def lm_loss_fn(
    model: nnx.Module, batch: dict[str, Any], rng: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
    """The training loss: forward pass on batch["tokens"] and `lm_loss` against batch["mask"]
    (for nnx.grad). `heads_loss` gives the same numbers without keeping the heads' logits
    for the backward pass, but saves nothing measurable (the 7B-shaped CPU bench with
    per-layer parameters; a v5p-8 compile of Moshi 7B)."""
    tokens = jnp.asarray(batch["tokens"])
    return lm_loss(model(tokens, rng=rng), tokens, jnp.asarray(batch["mask"]), model.cfg)


__all__ = ["cross_entropy", "heads_loss", "lm_loss", "lm_loss_fn"]
