"""The multi-stream speech-text LM: temporal transformer over frames, depth transformer over
the codebooks of each frame (Moshi per-step weights, or a CSM-style shared decoder).

Tokens are [B, S, T] over streams [text, n_q model codebooks, n_q user codebooks]. In the
*delayed* space each stream is already shifted by its delay (see sfm.lm.layout): the
temporal step t reads the tokens of frame t - 1 (the initial tokens at t = 0) and predicts
the text and the model's codebooks of frame t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sfm.lm.config import LMConfig
from sfm.lm.layers import ACTIVATION_AXES, Embedding, LayerStack, StepLinear
from sfm.lm.layout import IGNORE, INITIAL
from sfm.nn.norm import RMSNorm
from sfm.parallel.rules import constrain

State = dict[str, Any]
# Logical axes of activations (sfm.parallel.rules.constrain: batch-sharded on a mesh, a
# no-op without one): depth transformer input [B * T, K, D'], logits [B, T, (K,) vocab].
DEPTH_AXES = ("batch", "time", "depth_embed")
TEXT_LOGIT_AXES = ("batch", "time", "vocab")
AUDIO_LOGIT_AXES = ("batch", "time", "steps", "vocab")
# Inputs of a group of heads [K, rows, D]: the rows (batch x frames) batch-sharded.
HEAD_AXES = ("steps", "batch", "depth_embed")


@jax.tree_util.register_dataclass
@dataclass
class LMOutput:
    """Logits of one forward pass in the delayed space.

    text_logits  [B, T, text_card]
    audio_logits [B, T, dep_q, card]   codebook k of the model's voice at frame t
    depth_mask   [B, T] or None        frames whose codebooks >= 1 were computed (CSM
                                       compute amortization); None means all frames
    """

    text_logits: jax.Array
    audio_logits: jax.Array
    depth_mask: jax.Array | None = None


@dataclass(frozen=True)
class Heads:
    """A group of output heads, step-major: logits[k] = x_kni[k] @ kernel_kvi[k].T.

    x_kni      [K, N, in]   row n is frame t of item b: n = b * T + t, or with `frames_bn`
                            n = b * n_frames + j for frame frames_bn[b, j]
    kernel_kvi [K, vocab, in] in x's dtype, adapters folded in
    frames_bn  [B, n_frames] or None (every frame)
    """

    x_kni: jax.Array
    kernel_kvi: jax.Array
    frames_bn: jax.Array | None = None

    def logits(self) -> jax.Array:
        """[K, N, vocab] in x's dtype."""
        return jnp.einsum("kni,kvi->knv", self.x_kni, self.kernel_kvi)


@dataclass(frozen=True)
class LMHeads:
    """What the output heads of one teacher-forced pass read (see `LM.head_inputs`): the text head
    over all frames, and the model's codebooks 0..dep_q-1 in order, split into groups."""

    text: Heads
    audio: tuple[Heads, ...]


def _rows(x_btd: jax.Array) -> jax.Array:
    """[B, T, D] -> one head's input [1, B * T, D]."""
    return x_btd.reshape(1, -1, x_btd.shape[-1])


def _layer_kw(t: Any, context: int | None, max_period: float | None, cfg: LMConfig) -> dict:
    return dict(
        dim=t.dim,
        num_heads=t.num_heads,
        kv_heads=t.kv_heads,
        hidden=t.hidden,
        context=context,
        max_period=max_period,
        norm_eps=t.norm_eps,
        param_dtype=cfg.param_dtype,
        impl=cfg.attention_impl,
    )


class MoshiDepth(nnx.Module):
    """Depformer: step k reads proj_k(h) + emb(token k - 1 of the frame; the text for k = 0)
    and predicts codebook k, with separate weights per step and no positional embedding."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs) -> None:
        d, k = cfg.depth, cfg.dep_q
        pd = cfg.param_dtype
        self.cfg = cfg
        self.depformer_in = StepLinear(
            cfg.temporal.dim,
            d.dim,
            n_weights=k,
            axes=("embed", "depth_embed"),
            param_dtype=pd,
            rngs=rngs,
        )
        self.text_emb = Embedding(cfg.text_card, d.dim, param_dtype=pd, rngs=rngs)
        self.emb = nnx.List(
            [Embedding(cfg.card, d.dim, param_dtype=pd, rngs=rngs) for _ in range(k - 1)]
        )
        self.transformer = LayerStack(
            d.num_layers,
            remat=cfg.temporal.remat,
            scan_unroll=d.scan_unroll,
            scan_layers=d.scan_layers,
            n_weights=k,
            rngs=rngs,
            **_layer_kw(d, None, d.max_period, cfg),
        )
        self.linears = StepLinear(
            d.dim, cfg.card, n_weights=k, axes=("depth_embed", "vocab"), param_dtype=pd, rngs=rngs
        )

    def _token_emb(self, k: int, tokens: jax.Array, dtype: Any) -> jax.Array:
        return (self.text_emb if k == 0 else self.emb[k - 1])(tokens, dtype)

    def head_inputs(
        self, h_btd: jax.Array, tokens_bst: jax.Array, rng: jax.Array | None
    ) -> tuple[Heads, ...]:
        """Teacher forcing: the inputs of the dep_q heads, every frame, as one group."""
        b, t, _ = h_btd.shape
        k = self.cfg.dep_q
        steps = tuple(range(k))
        kernel = self.depformer_in.kernel[...].astype(h_btd.dtype)
        proj = jnp.einsum("btd,kod->kbto", h_btd, kernel)
        emb = jnp.stack(
            [self._token_emb(i, tokens_bst[:, i], h_btd.dtype) for i in range(k)], axis=0
        )
        # step-major [K, B * T, D']: every linear has per-step weights (see LayerStack)
        x = constrain((proj + emb).reshape(k, b * t, -1), HEAD_AXES)
        pos = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b * t, k))
        y = constrain(self.transformer(x, pos, steps, time_major=True), HEAD_AXES)
        return (Heads(y, self.linears.weights(y.dtype)),)

    def init_state(self, batch: int, dtype: Any) -> State:
        return self.transformer.init_state(batch, self.cfg.dep_q, dtype)

    def step(
        self, state: State, k: int, h_bd: jax.Array, prev_b: jax.Array
    ) -> tuple[State, jax.Array]:
        """Depth step k: logits [B, card] of codebook k given the previous token of the frame."""
        w = self.depformer_in.kernel[k].astype(h_bd.dtype)
        x = jnp.einsum("bd,od->bo", h_bd, w) + self._token_emb(k, prev_b, h_bd.dtype)
        pos = jnp.full((h_bd.shape[0], 1), k, jnp.int32)
        state, y = self.transformer.step(state, x[:, None], pos, (k,))
        return state, self.linears(y, (k,))[:, 0]


class CsmDepth(nnx.Module):
    """CSM-style decoder: codebook 0 from the temporal output; a shared decoder over
    [h, emb(c_0), ..., emb(c_{K-2})] (RoPE over the position) predicts c_1..c_{K-1}."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs) -> None:
        d, pd = cfg.depth, cfg.param_dtype
        self.cfg = cfg
        self.head0 = StepLinear(
            cfg.temporal.dim, cfg.card, axes=("embed", "vocab"), param_dtype=pd, rngs=rngs
        )
        self.proj = StepLinear(
            cfg.temporal.dim, d.dim, axes=("embed", "depth_embed"), param_dtype=pd, rngs=rngs
        )
        self.transformer = LayerStack(
            d.num_layers,
            remat=cfg.temporal.remat,
            scan_unroll=d.scan_unroll,
            scan_layers=d.scan_layers,
            rngs=rngs,
            **_layer_kw(d, None, d.max_period, cfg),
        )
        self.heads = StepLinear(
            d.dim,
            cfg.card,
            n_weights=cfg.dep_q - 1,
            axes=("depth_embed", "vocab"),
            param_dtype=pd,
            rngs=rngs,
        )

    def _frames(self, b: int, t: int, rng: jax.Array | None) -> jax.Array | None:
        """[B, n] random frame indices for amortized training, None for all frames."""
        every = self.cfg.depth.amortize_every
        if every == 1 or rng is None:
            return None
        n = max(1, t // every)
        noise = jax.random.uniform(rng, (b, t))
        return jnp.sort(jnp.argsort(noise, axis=1)[:, :n], axis=1)

    def head_inputs(
        self, h_btd: jax.Array, tokens_bst: jax.Array, rng: jax.Array | None, emb: nnx.List
    ) -> tuple[Heads, ...]:
        """Teacher forcing: codebook 0's head on every frame, then the decoder's dep_q - 1
        heads on the frames drawn for amortization (all frames without `rng`)."""
        b, t, _ = h_btd.shape
        k = self.cfg.dep_q
        first = Heads(_rows(h_btd), self.head0.weights(h_btd.dtype))
        frames = self._frames(b, t, rng)
        h_sel, tok_sel = h_btd, tokens_bst
        if frames is not None:
            h_sel = jnp.take_along_axis(h_btd, frames[:, :, None], axis=1)
            tok_sel = jnp.take_along_axis(tokens_bst, frames[:, None, :], axis=2)
        n = h_sel.shape[1]
        parts = [h_sel] + [emb[i](tok_sel[:, 1 + i], h_btd.dtype) for i in range(k - 1)]
        x = constrain(self.proj(jnp.stack(parts, axis=2)).reshape(b * n, k, -1), DEPTH_AXES)
        pos = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b * n, k))
        y = constrain(jnp.moveaxis(self.transformer(x, pos)[:, 1:], 1, 0), HEAD_AXES)
        return first, Heads(y, self.heads.weights(y.dtype), frames)

    def init_state(self, batch: int, dtype: Any) -> State:
        return self.transformer.init_state(batch, self.cfg.dep_q, dtype)

    def first_logits(self, h_bd: jax.Array) -> jax.Array:
        """Codebook 0 logits [B, card] from the temporal output."""
        return self.head0(h_bd[:, None])[:, 0]

    def step(
        self, state: State, k: int, h_bd: jax.Array, prev_b: jax.Array, emb: nnx.List
    ) -> tuple[State, jax.Array]:
        """Depth step k >= 1: logits [B, card] of codebook k given c_{k-1}."""
        e = emb[k - 1](prev_b, h_bd.dtype)
        x = jnp.stack([h_bd, e], axis=1) if k == 1 else e[:, None]
        t0 = 0 if k == 1 else k
        pos = jnp.broadcast_to(jnp.arange(t0, k + 1, dtype=jnp.int32), (h_bd.shape[0], x.shape[1]))
        state, y = self.transformer.step(state, self.proj(x), pos)
        return state, self.heads(y[:, -1:], (k - 1,))[:, 0]


class LM(nnx.Module):
    """Embeddings of all streams (summed) -> temporal transformer -> text head + depth."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs) -> None:
        t, pd = cfg.temporal, cfg.param_dtype
        self.cfg = cfg
        self.text_emb = Embedding(cfg.text_card, t.dim, param_dtype=pd, rngs=rngs)
        self.emb = nnx.List(
            [Embedding(cfg.card, t.dim, param_dtype=pd, rngs=rngs) for _ in range(cfg.n_audio)]
        )
        self.transformer = LayerStack(
            t.num_layers,
            remat=t.remat,
            scan_unroll=t.scan_unroll,
            scan_layers=t.scan_layers,
            rngs=rngs,
            **_layer_kw(t, t.context, t.max_period, cfg),
        )
        self.out_norm = RMSNorm(t.dim, eps=t.norm_eps, param_dtype=pd)
        self.text_linear = StepLinear(
            t.dim, cfg.text_card, axes=("embed", "vocab"), param_dtype=pd, rngs=rngs
        )
        self.depth: MoshiDepth | CsmDepth = (
            MoshiDepth(cfg, rngs=rngs) if cfg.depth.kind == "moshi" else CsmDepth(cfg, rngs=rngs)
        )

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self.cfg.dtype)

    def embed(self, tokens_bst: jax.Array) -> jax.Array:
        """Sum of the stream embeddings [B, T, D]; -1 adds nothing, -2 is the initial token."""
        x = self.text_emb(tokens_bst[:, 0], self.dtype)
        for s, emb in enumerate(self.emb):
            x = x + emb(tokens_bst[:, 1 + s], self.dtype)
        return x

    def backbone(self, inputs_bst: jax.Array) -> jax.Array:
        """Temporal transformer over input tokens (frame t - 1 at step t) -> normed h [B, T, D]."""
        b, _, t = inputs_bst.shape
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = constrain(self.embed(inputs_bst), ACTIVATION_AXES)
        return constrain(self.out_norm(self.transformer(x, pos)), ACTIVATION_AXES)

    def head_inputs(self, tokens_bst: jax.Array, *, rng: jax.Array | None = None) -> LMHeads:
        """Teacher forcing on delayed tokens [B, S, T] up to the output heads: their inputs
        and kernels (the loss multiplies them itself, see sfm.lm.loss). `rng` draws the
        frames of CSM compute amortization."""
        b, s, _ = tokens_bst.shape
        initial = jnp.full((b, s, 1), INITIAL, tokens_bst.dtype)
        h = self.backbone(jnp.concatenate([initial, tokens_bst[:, :, :-1]], axis=2))
        text = Heads(_rows(h), self.text_linear.weights(h.dtype))
        if isinstance(self.depth, CsmDepth):
            return LMHeads(text, self.depth.head_inputs(h, tokens_bst, rng, self.emb))
        return LMHeads(text, self.depth.head_inputs(h, tokens_bst, rng))

    def __call__(self, tokens_bst: jax.Array, *, rng: jax.Array | None = None) -> LMOutput:
        """Teacher-forced logits for delayed tokens [B, S, T] (see LMOutput)."""
        b, _, t = tokens_bst.shape
        heads = self.head_inputs(tokens_bst, rng=rng)
        text = constrain(heads.text.logits().reshape(b, t, -1), TEXT_LOGIT_AXES)
        audio, depth_mask = [], None
        for group in heads.audio:
            logits = jnp.moveaxis(group.logits(), 0, 1)  # [N, K, vocab]
            if group.frames_bn is None:
                audio.append(logits.reshape(b, t, *logits.shape[1:]))
                continue
            rows = jnp.arange(b)[:, None]
            full = jnp.zeros((b, t, *logits.shape[1:]), logits.dtype)
            picked = logits.reshape(b, -1, *logits.shape[1:])
            audio.append(full.at[rows, group.frames_bn].set(picked))
            depth_mask = jnp.zeros((b, t), bool).at[rows, group.frames_bn].set(True)
        audio_logits = constrain(jnp.concatenate(audio, axis=2), AUDIO_LOGIT_AXES)
        return LMOutput(text, audio_logits, depth_mask)

    # ------------------------------------------------------------------ streaming

    def init_state(self, batch: int, capacity: int | None = None) -> State:
        """Temporal KV rings (capacity defaults to the context) and per-item frame offsets."""
        cap = capacity or self.cfg.temporal.context
        return {
            "offset": jnp.zeros((batch,), jnp.int32),
            "transformer": self.transformer.init_state(batch, cap, self.dtype),
        }

    def temporal_step(
        self, state: State, inputs_bs: jax.Array
    ) -> tuple[State, jax.Array, jax.Array]:
        """One frame: input tokens [B, S] -> (state, h [B, D], text logits [B, text_card])."""
        pos = state["offset"][:, None]
        tr, h = self.transformer.step(state["transformer"], self.embed(inputs_bs[:, :, None]), pos)
        h = self.out_norm(h)[:, 0]
        state = {"offset": state["offset"] + 1, "transformer": tr}
        return state, h, self.text_linear(h[:, None])[:, 0]

    def depth_init_state(self, batch: int) -> State:
        return self.depth.init_state(batch, self.dtype)

    def depth_step(
        self, state: State, k: int, h_bd: jax.Array, prev_b: jax.Array
    ) -> tuple[State, jax.Array]:
        """Logits [B, card] of the model's codebook k given the previous token of the frame
        (the text token for k = 0 in the Moshi depformer; c_{k-1} otherwise)."""
        if isinstance(self.depth, CsmDepth):
            if k == 0:
                return state, self.depth.first_logits(h_bd)
            return self.depth.step(state, k, h_bd, prev_b, self.emb)
        return self.depth.step(state, k, h_bd, prev_b)


def param_count(cfg: LMConfig) -> int:
    """Number of parameters, counted on abstract shapes (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


__all__ = ["IGNORE", "INITIAL", "LM", "LMHeads", "LMOutput", "Heads", "param_count"]
