"""Streaming generation with the LM, one frame per step (the semantics of Moshi's `LMGen`).

Each session keeps a ring of `max_delay + 2` delayed frames per stream. At step t (the
session's offset) the user's codes of frame t are written at position t + delay; the input
of the temporal transformer is position t, the initial token while t <= delay; the sampled
text and model codebooks are written at position t + 1; once t >= max_delay the frame
t - max_delay is read back at the per-stream delays.

Alignment: as in `LMGen`, the user's frame t is read at step t next to the model's frame
t - 1 (the first user frame is never seen). In the training layout this is the user stream
moved one frame earlier: the model's frame t sits next to the user's frame t + 1.

Model codebooks the depth transformer does not predict (dep_q < n_q) are fed as -1 (zero
embedding). One step is one compiled function (temporal step, text sampling, dep_q depth
steps with sampling); the state is donated.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sfm.lm.config import SamplingConfig
from sfm.lm.fused_depth import fused_depth_tokens
from sfm.lm.layout import IGNORE, INITIAL
from sfm.lm.model import LM
from sfm.nn.streaming import StaticModel


class GenState(NamedTuple):
    """Per-session generation state; every leaf has the batch on axis 0 except the stacked
    temporal KV rings (`lm["transformer"]`, [layers, B, ...] unless lm.temporal.scan_layers
    is false: then a list of [B, ...] rings)."""

    lm: dict[str, Any]  # LM.init_state: offsets [B] and the temporal KV rings
    cache: jax.Array  # [B, S, max_delay + 2] ring of delayed tokens
    keys: jax.Array  # [B] PRNG keys; step t samples with fold_in(key, t)

    @property
    def offset(self) -> jax.Array:
        """Frames stepped so far per session [B]."""
        return self.lm["offset"]


def sample(
    key: jax.Array,
    logits_v: jax.Array,
    temp: float | jax.Array,
    top_k: int | jax.Array,
    greedy: bool,
    cap: int | None = None,
) -> jax.Array:
    """One token from logits [V]: argmax if greedy or temp <= 0, else top-k + temperature.

    `temp` and `top_k` may be traced (a session's own settings); `cap` (static, default
    `top_k`) bounds top_k: the `cap` best logits are kept and those past `top_k` masked
    (top_k <= 0 keeps all `cap`). cap 0, or >= V, samples the full distribution."""
    logits_v = logits_v.astype(jnp.float32)
    cap = int(top_k) if cap is None else cap
    if greedy or (isinstance(temp, float | int) and temp <= 0):
        return jnp.argmax(logits_v).astype(jnp.int32)
    if 0 < cap < logits_v.shape[-1]:
        vals, idx = jax.lax.top_k(logits_v, cap)
        k = jnp.where((top_k > 0) & (top_k < cap), top_k, cap)
        vals = jnp.where(jnp.arange(cap) < k, vals, -jnp.inf)
        best, drawn = idx[0], idx[jax.random.categorical(key, vals / _positive(temp))]
    else:
        best = jnp.argmax(logits_v)
        drawn = jax.random.categorical(key, logits_v / _positive(temp))
    return jnp.where(temp > 0, drawn, best).astype(jnp.int32)


def _positive(temp: float | jax.Array) -> float | jax.Array:
    """`temp` where it is > 0 (1 elsewhere, where the draw is not used)."""
    return temp if isinstance(temp, float | int) else jnp.where(temp > 0, temp, 1.0)


class SlotSampling(NamedTuple):
    """Each session's own sampling, [B] arrays: temperatures (<= 0: argmax) and top-k
    (<= 0: the engine's SamplingConfig value, which also caps them)."""

    temp_text: jax.Array
    top_k_text: jax.Array
    temp: jax.Array
    top_k: jax.Array

    @staticmethod
    def full(s: SamplingConfig, batch: int | Any) -> SlotSampling:
        """Every session at the engine's settings."""
        f, i = (
            partial(jnp.full, (batch,), dtype=jnp.float32),
            partial(jnp.full, (batch,), dtype=jnp.int32),
        )
        return SlotSampling(f(s.temp_text), i(s.top_k_text), f(s.temp), i(s.top_k))


def _sample_b(
    keys_b: jax.Array,
    logits_bv: jax.Array,
    temp: float | jax.Array,
    top_k: int | jax.Array,
    greedy: bool,
    cap: int,
) -> jax.Array:
    fn = partial(sample, greedy=greedy, cap=cap)
    if isinstance(temp, float | int):  # engine-wide settings: static
        return jax.vmap(lambda k, x: fn(k, x, temp, top_k))(keys_b, logits_bv)
    return jax.vmap(fn)(keys_b, logits_bv, temp, top_k)


def _session_keys(key: jax.Array, batch: int) -> jax.Array:
    """[B] typed keys: a single key gives session i fold_in(key, i); a [B] batch is kept."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
    if key.shape != (batch,):
        raise ValueError(f"keys of shape {key.shape}, expected () or ({batch},)")
    return key


def _sample_frame(
    model: LM,
    sampling: SamplingConfig,
    keys: jax.Array,
    h_bd: jax.Array,
    text_logits: jax.Array,
    slots: SlotSampling | None = None,
) -> jax.Array:
    """Text, then the dep_q codebooks through the depth transformer: tokens [B, 1 + dep_q].
    With lm.attention_impl "pallas" the depth transformer runs as one fused kernel that
    samples its own tokens (`sfm.kernels.sampling`: the same distribution, other draws)."""
    s, n = sampling, model.cfg.dep_q
    text_t, text_k, audio_t, audio_k = (
        (s.temp_text, s.top_k_text, s.temp, s.top_k) if slots is None else slots
    )
    text = _sample_b(keys[:, 0], text_logits, text_t, text_k, s.greedy, s.top_k_text)
    if model.cfg.attention_impl == "pallas":  # the whole depth frame in one fused kernel
        audio = fused_depth_tokens(
            model, keys[:, 1], h_bd, text, audio_t, audio_k, greedy=s.greedy, cap=s.top_k
        )
        return jnp.concatenate([text[:, None], audio], axis=1)
    dstate, prev, out = model.depth_init_state(h_bd.shape[0]), text, [text]
    for k in range(n):
        dstate, logits = model.depth_step(dstate, k, h_bd, prev)
        prev = _sample_b(keys[:, 1 + k], logits, audio_t, audio_k, s.greedy, s.top_k)
        out.append(prev)
    return jnp.stack(out, axis=1)


def frame_step(
    model: LM,
    sampling: SamplingConfig,
    state: GenState,
    user_bk: jax.Array,
    slots: SlotSampling | None = None,
) -> tuple[GenState, jax.Array, jax.Array]:
    """One frame for every session: (state, tokens [B, 1 + dep_q] of frame t - max_delay,
    valid [B]); tokens are -2 where no frame is out yet. `slots` gives each session its own
    temperatures and top-k (capped by `sampling`'s); None: `sampling` for all."""
    cfg = model.cfg
    b, n_gen, ring = user_bk.shape[0], 1 + cfg.dep_q, state.cache.shape[2]
    delays = jnp.asarray(cfg.delays, jnp.int32)
    off, rows = state.offset, jnp.arange(b)[:, None]
    user_streams = jnp.arange(1 + cfg.n_q, cfg.n_streams)[None]
    at = (off[:, None] + delays[None, 1 + cfg.n_q :]) % ring
    cache = state.cache.at[rows, user_streams, at].set(user_bk.astype(jnp.int32))
    inputs = cache[rows, jnp.arange(cfg.n_streams)[None], (off % ring)[:, None]]
    inputs = jnp.where(off[:, None] <= delays[None], INITIAL, inputs)
    lm, h, text_logits = model.temporal_step(state.lm, inputs)
    step_keys = jax.vmap(lambda k, t: jax.random.split(jax.random.fold_in(k, t), n_gen))(
        state.keys, off
    )
    tokens = _sample_frame(model, sampling, step_keys, h, text_logits, slots)
    gen, nxt = jnp.arange(n_gen)[None], off + 1
    cache = cache.at[rows, gen, (nxt % ring)[:, None]].set(tokens)
    out = cache[rows, gen, (nxt[:, None] - cfg.max_delay + delays[None, :n_gen]) % ring]
    valid = nxt > cfg.max_delay
    out = jnp.where(valid[:, None], out, INITIAL)
    return GenState(lm, cache, state.keys), out, valid


def init_state(model: LM, keys_b: jax.Array, capacity: int | None) -> GenState:
    """Fresh sessions: empty KV rings, offsets 0, a ring of -1 (zero embedding) tokens."""
    cfg, b = model.cfg, keys_b.shape[0]
    cache = jnp.full((b, cfg.n_streams, cfg.max_delay + 2), IGNORE, jnp.int32)
    return GenState(model.init_state(b, capacity), cache, keys_b)


def reset_state(
    model: LM, state: GenState, mask_b: jax.Array, keys_b: jax.Array | None = None
) -> GenState:
    """Restart the sessions where `mask_b` is true, with keys `keys_b` (default: their own);
    the others are untouched."""
    keys_b = state.keys if keys_b is None else keys_b
    layers = model.transformer
    b, capacity = mask_b.shape[0], layers.cache_capacity(state.lm["transformer"])
    fresh = init_state(model, keys_b, capacity)

    def pick(axis: int) -> Any:
        def where(old: jax.Array, new: jax.Array) -> jax.Array:
            shape = [1] * old.ndim
            shape[axis] = b
            return jnp.where(mask_b.reshape(shape), new, old)

        return where

    lm = {
        "offset": pick(0)(state.lm["offset"], fresh.lm["offset"]),
        "transformer": jax.tree.map(
            pick(layers.cache_batch_axis), state.lm["transformer"], fresh.lm["transformer"]
        ),
    }
    return GenState(lm, pick(0)(state.cache, fresh.cache), pick(0)(state.keys, keys_b))


@partial(jax.jit, static_argnums=(0, 4), donate_argnums=(2,))
def _step(static: StaticModel, leaves: list, state: GenState, user_bk: jax.Array, s: Any) -> Any:
    return frame_step(static.model(leaves), s, state, user_bk)


@partial(jax.jit, static_argnums=(0, 2))
def _init(static: StaticModel, leaves: list, capacity: int | None, keys_b: jax.Array) -> GenState:
    return init_state(static.model(leaves), keys_b, capacity)


@partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _reset(
    static: StaticModel, leaves: list, state: GenState, mask_b: jax.Array, keys_b: jax.Array | None
) -> GenState:
    return reset_state(static.model(leaves), state, mask_b, keys_b)


@partial(jax.jit, static_argnums=(0, 4), donate_argnums=(2,))
def _run(static: StaticModel, leaves: list, state: GenState, user_tbk: jax.Array, s: Any) -> Any:
    def body(st: GenState, user_bk: jax.Array) -> tuple[GenState, jax.Array]:
        # The module is rebuilt inside the scan: nnx modules do not cross trace levels.
        st, out, _ = frame_step(static.model(leaves), s, st, user_bk)
        return st, out

    return jax.lax.scan(body, state, user_tbk)


class Generator:
    """Streams frames for a batch of independent sessions with one compiled step.

    `step` donates the state it is given: use only the state it returns."""

    def __init__(self, model: LM, sampling: SamplingConfig, capacity: int | None = None) -> None:
        self.cfg, self.sampling, self.capacity = model.cfg, sampling, capacity
        graphdef, params = nnx.split(model)
        self._leaves, treedef = jax.tree.flatten(params)
        self._static = StaticModel(graphdef, treedef)

    def init(self, batch: int, key: jax.Array) -> GenState:
        """`batch` fresh sessions; session i samples with fold_in(key, i) (or key[i] if [B])."""
        return _init(self._static, self._leaves, self.capacity, _session_keys(key, batch))

    def step(
        self, state: GenState, user_codes_bk: jax.Array
    ) -> tuple[GenState, jax.Array, jax.Array]:
        """User codes [B, n_q] of the current frame -> (state, tokens [B, 1 + dep_q], valid [B]).

        tokens are text + model codebooks of frame t - max_delay, -2 where not valid yet."""
        user = jnp.asarray(user_codes_bk, jnp.int32)
        return _step(self._static, self._leaves, state, user, self.sampling)

    def reset(self, state: GenState, mask_b: jax.Array, key: jax.Array | None = None) -> GenState:
        """Restart the sessions where `mask_b` is true, by default with their current keys
        (so they replay a fresh session); `key` as in `init` gives new ones."""
        mask = jnp.asarray(mask_b, jnp.bool_)
        keys = None if key is None else _session_keys(key, mask.shape[0])
        return _reset(self._static, self._leaves, state, mask, keys)

    def run(self, state: GenState, user_codes_bkt: jax.Array) -> tuple[GenState, jax.Array]:
        """`step` over user codes [B, n_q, T] in one scan (state donated): (state, tokens
        [B, 1 + dep_q, T] as `step` emits them, frame t - max_delay at step t)."""
        user = jnp.moveaxis(jnp.asarray(user_codes_bkt, jnp.int32), 2, 0)
        state, out = _run(self._static, self._leaves, state, user, self.sampling)
        return state, jnp.moveaxis(out, 0, 2)


def generate(
    model: LM, user_codes_bkt: jax.Array, sampling: SamplingConfig, key: jax.Array
) -> jax.Array:
    """Respond to whole user streams [B, n_q, T]: the model's frames [B, 1 + dep_q, T],
    undelayed; stream s of frame t has heard the user up to frame t + delay[s]. The user is
    padded with -1 (absent input) for the max_delay frames the delayed streams lag."""
    b = user_codes_bkt.shape[0]
    delay = model.cfg.max_delay
    gen = Generator(model, sampling)
    pad = jnp.full((b, user_codes_bkt.shape[1], delay), IGNORE, jnp.int32)
    user = jnp.concatenate([jnp.asarray(user_codes_bkt, jnp.int32), pad], axis=2)
    _, out = gen.run(gen.init(b, key), user)
    return out[:, :, delay:]


__all__ = [
    "GenState",
    "Generator",
    "SamplingConfig",
    "SlotSampling",
    "frame_step",
    "generate",
    "sample",
]
