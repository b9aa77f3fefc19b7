"""A batched full-duplex engine: many conversations at once, one codec frame per step.

The engine has a fixed number of slots. A conversation joins a free slot (which is reset:
fresh codec and LM state, its own sampling key), sends one frame of user audio per step and
gets back one frame of the model's audio and its text token; it leaves when done. Joining,
leaving and resetting never recompile anything: they are masks over the slot axis.

Per frame (80 ms for Mimi) one jitted function runs for all slots, its state donated:

    user audio [slots, frame] -> streaming encode -> LM frame step (text, then the depth
    transformer's codebooks) -> streaming decode -> model audio [slots, frame]

The LM's delayed streams make its first `max_delay` frames empty (`valid` false): their
audio is silence and the decoder state does not advance, exactly as if they were never
decoded. Idle slots run too (on silence); their state is discarded when a session joins.

    engine = Engine(codec, lm, slots=8, sampling=cfg.sampling)  # the run's own
    slot = engine.join()
    out = engine.step({slot: user_frame})      # out.audio[slot], out.text[slot], out.valid[slot]
    engine.leave(slot)
    engine.latency_ms()                         # {"p50": ..., "p95": ..., "p99": ...}
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfm.codec.model import Mimi
from sfm.infer.config import WeightFormat
from sfm.infer.quantize import dequantize, serving_leaves, weight_bytes
from sfm.lm.generate import (
    GenState,
    SamplingConfig,
    SlotSampling,
    frame_step,
    init_state,
    reset_state,
)
from sfm.lm.model import LM
from sfm.nn.streaming import StaticModel, reset_where

LATENCY_WINDOW = 10_000  # per-frame latencies kept for the percentiles


@dataclasses.dataclass(frozen=True)
class SessionSampling:
    """One session's sampling; None keeps the engine's setting. Temperatures >= 0 (0: argmax),
    top-k >= 0 (0: the engine's), at most the engine's top-k (which bounds every session)."""

    temp_text: float | None = None
    top_k_text: int | None = None
    temp: float | None = None
    top_k: int | None = None

    def resolve(self, engine: SamplingConfig) -> SamplingConfig:
        """The engine's settings with this session's in place; ValueError naming the setting
        when one is out of range."""
        own = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{field.name}: must be a finite number >= 0, got {value}")
            own[field.name] = int(value) if field.name.startswith("top_k") else float(value)
        return dataclasses.replace(engine, **own)


class EngineState(NamedTuple):
    """Every slot's streaming state; batch (slot) axis first except the LM's KV rings."""

    encode: Any  # the codec encoder's streaming state
    decode: Any  # the codec decoder's streaming state
    gen: GenState  # the LM's generation state (offsets, KV rings, delayed-token ring, keys)
    sampling: SlotSampling  # each session's temperatures and top-k


class Frame(NamedTuple):
    """One step's output for every slot (host arrays)."""

    audio: np.ndarray  # float32 [slots, frame_size]: the model's voice (silence until valid)
    text: np.ndarray  # int32 [slots]: the model's text token (-2 until valid)
    codes: np.ndarray  # int32 [slots, dep_q]: the model's audio codes (-2 until valid)
    valid: np.ndarray  # bool [slots]: whether the LM has emitted this slot's frame yet


class Models(NamedTuple):
    """The codec and the LM, rebuilt inside a trace from their flat parameter leaves (the
    LM's possibly int8: dequantized to its compute dtype on the way)."""

    codec: StaticModel
    lm: StaticModel
    lm_dtype: str

    def build(self, leaves: tuple) -> tuple[Mimi, LM]:
        return self.codec.model(leaves[0]), self.lm.model(dequantize(leaves[1], self.lm_dtype))


def _split(model: nnx.Module) -> tuple[StaticModel, list]:
    graphdef, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(params)
    return StaticModel(graphdef, treedef), leaves


def serving_models(codec: Mimi, lm: LM, weights: WeightFormat) -> tuple[Models, tuple]:
    """The static halves of the models and their leaves as served: (codec leaves with frozen
    codebooks, LM leaves stored as `weights`)."""
    serving = nnx.merge(*nnx.split(codec))  # same arrays, new module: frozen codebooks
    serving.freeze_codebooks()
    codec_static, codec_leaves = _split(serving)
    lm_static, _ = _split(lm)
    models = Models(codec_static, lm_static, lm.cfg.dtype)
    return models, (codec_leaves, serving_leaves(lm, weights))


def engine_step(
    codec: Mimi, lm: LM, sampling: SamplingConfig, state: EngineState, wav_bt: jax.Array
) -> tuple[EngineState, jax.Array, jax.Array, jax.Array]:
    """One frame for every slot: (state, tokens [B, 1 + dep_q], audio [B, frame], valid [B])."""
    encode, user_bkt = codec.encode_step(state.encode, wav_bt, lm.cfg.n_q)
    gen, tokens, valid = frame_step(lm, sampling, state.gen, user_bkt[:, :, 0], state.sampling)
    stepped, audio = codec.decode_step(state.decode, jnp.maximum(tokens[:, 1:, None], 0))
    decode = reset_where(state.decode, stepped, valid)  # an empty frame leaves it untouched
    audio = jnp.where(valid[:, None], audio, 0.0)
    return EngineState(encode, decode, gen, state.sampling), tokens, audio, valid


def fresh_state(
    codec: Mimi, lm: LM, keys_b: jax.Array, capacity: int | None, sampling_b: SlotSampling
) -> EngineState:
    """Every slot at the start of a session."""
    b = keys_b.shape[0]
    gen = init_state(lm, keys_b, capacity)
    return EngineState(codec.init_encode_state(b), codec.init_decode_state(b), gen, sampling_b)


def reset_slots(
    codec: Mimi,
    lm: LM,
    state: EngineState,
    mask_b: jax.Array,
    keys_b: jax.Array,
    sampling_b: SlotSampling,
) -> EngineState:
    """Restart the slots where `mask_b` is true with keys `keys_b` and sampling `sampling_b`;
    the others are untouched."""
    b = mask_b.shape[0]
    return EngineState(
        reset_where(state.encode, codec.init_encode_state(b), mask_b),
        reset_where(state.decode, codec.init_decode_state(b), mask_b),
        reset_state(lm, state.gen, mask_b, keys_b),
        reset_where(state.sampling, sampling_b, mask_b),
    )


@partial(jax.jit, static_argnums=(0, 3), donate_argnums=(2,))
def _step(
    models: Models, leaves: tuple, state: EngineState, s: SamplingConfig, wav_bf: jax.Array
) -> tuple[EngineState, jax.Array, jax.Array, jax.Array]:
    return engine_step(*models.build(leaves), s, state, wav_bf)


@partial(jax.jit, static_argnums=(0, 3))
def _init(
    models: Models, leaves: tuple, keys_b: jax.Array, capacity: int | None, sampling_b: Any
) -> EngineState:
    return fresh_state(*models.build(leaves), keys_b, capacity, sampling_b)


@partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _reset(
    models: Models,
    leaves: tuple,
    state: EngineState,
    mask_b: jax.Array,
    keys_b: jax.Array,
    sampling_b: SlotSampling,
) -> EngineState:
    return reset_slots(*models.build(leaves), state, mask_b, keys_b, sampling_b)


class Engine:
    """`slots` concurrent full-duplex sessions of `lm` speaking through `codec`.

    The codec serves with frozen codebooks; the LM's text and audio streams must match the
    codec (lm.n_q codebooks encoded per user frame, lm.dep_q decoded per model frame).
    `weights` stores the LM's parameters as float32, bfloat16, or int8 (linear kernels,
    per-channel scales; the rest bfloat16): see `sfm.infer.quantize`. The codec stays as
    given."""

    def __init__(
        self,
        codec: Mimi,
        lm: LM,
        slots: int,
        sampling: SamplingConfig = SamplingConfig(),
        *,
        seed: int = 0,
        capacity: int | None = None,
        weights: WeightFormat = "float32",
    ) -> None:
        if lm.cfg.n_q > codec.cfg.n_q or lm.cfg.dep_q > codec.cfg.n_q:
            raise ValueError(
                f"the LM reads {lm.cfg.n_q} and writes {lm.cfg.dep_q} codebooks; the codec "
                f"has {codec.cfg.n_q}"
            )
        self._models, self._leaves = serving_models(codec, lm, weights)
        self.weights = weights
        self.slots, self.sampling = slots, sampling
        self.frame_size, self.sample_rate = codec.cfg.frame_size, codec.cfg.sample_rate
        self._base_key = jax.random.key(seed)
        self._sessions = 0  # sessions started: the default key of the next is fold_in(seed, n)
        self._busy = np.zeros(slots, bool)
        keys = jax.vmap(lambda i: jax.random.fold_in(self._base_key, i))(jnp.arange(slots))
        defaults = SlotSampling.full(sampling, slots)
        self._state = _init(self._models, self._leaves, keys, capacity, defaults)
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    # ---------------------------------------------------------------- sessions

    def join(self, key: jax.Array | None = None, sampling: SessionSampling | None = None) -> int:
        """Start a session in a free slot and return the slot; `key` (a PRNG key) seeds its
        sampling, by default a new one per session; `sampling` sets its own temperatures and
        top-k. RuntimeError when every slot is busy."""
        free = np.flatnonzero(~self._busy)
        if free.size == 0:
            raise RuntimeError(f"all {self.slots} slots are busy")
        slot = int(free[0])
        if key is not None and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            raise ValueError("join: key must be a typed PRNG key (jax.random.key(seed))")
        if key is None:
            key = jax.random.fold_in(self._base_key, self.slots + self._sessions)
        self._sessions += 1
        self.reset(slot, key, sampling)
        self._busy[slot] = True
        return slot

    def leave(self, slot: int) -> None:
        """End the session in `slot`; the slot is free for the next `join`."""
        self._check(slot)
        self._busy[slot] = False

    def reset(
        self, slot: int, key: jax.Array | None = None, sampling: SessionSampling | None = None
    ) -> None:
        """Restart the session in `slot` (with `key`, else the slot's current key; with
        `sampling`, else the engine's settings)."""
        self._check(slot, busy_or_free=True)
        mask = np.zeros(self.slots, bool)
        mask[slot] = True
        keys = jnp.copy(self._state.gen.keys)  # a new buffer: the state is donated
        if key is not None:
            keys = keys.at[slot].set(key)
        own = (sampling or SessionSampling()).resolve(self.sampling)
        values = SlotSampling.full(own, self.slots)  # only `slot`'s entries are used
        self._state = _reset(
            self._models, self._leaves, self._state, jnp.asarray(mask), keys, values
        )

    @property
    def lm_weight_bytes(self) -> int:
        """Bytes of the LM's weights as served: what every frame step reads from memory."""
        return weight_bytes(self._leaves[1])

    @property
    def state_bytes(self) -> int:
        """Bytes of every slot's streaming state (KV rings first): read by every frame step."""
        return sum(int(x.nbytes) for x in jax.tree.leaves(self._state))

    @property
    def busy(self) -> np.ndarray:
        """bool [slots]: which slots hold a session."""
        return self._busy.copy()

    def _check(self, slot: int, busy_or_free: bool = False) -> None:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} out of range [0, {self.slots})")
        if not busy_or_free and not self._busy[slot]:
            raise ValueError(f"slot {slot} holds no session")

    # ---------------------------------------------------------------- frames

    def step(self, user: Mapping[int, np.ndarray] | np.ndarray) -> Frame:
        """One frame for every slot. `user`: {slot: audio [frame_size]} (other slots hear
        silence) or an array [slots, frame_size]."""
        wav = self._user_audio(user)
        t0 = time.perf_counter()
        self._state, tokens, audio, valid = _step(
            self._models, self._leaves, self._state, self.sampling, wav
        )
        tokens, audio, valid = jax.device_get((tokens, audio, valid))
        self._latencies.append((time.perf_counter() - t0) * 1e3)
        return Frame(np.asarray(audio), tokens[:, 0], tokens[:, 1:], np.asarray(valid))

    def _user_audio(self, user: Mapping[int, np.ndarray] | np.ndarray) -> jax.Array:
        if isinstance(user, Mapping):
            wav = np.zeros((self.slots, self.frame_size), np.float32)
            for slot, frame in user.items():
                self._check(slot)
                if np.shape(frame) != (self.frame_size,):
                    raise ValueError(
                        f"slot {slot}: user audio {np.shape(frame)}, expected ({self.frame_size},)"
                    )
                wav[slot] = frame
        else:
            wav = np.asarray(user, np.float32)
        if wav.shape != (self.slots, self.frame_size):
            raise ValueError(f"user audio {wav.shape}, expected {(self.slots, self.frame_size)}")
        return jnp.asarray(wav)

    def warm_up(self) -> None:
        """Compile the step (one frame of silence; only idle slots may be in use, since it
        advances every slot) and forget that frame's latency."""
        if self._busy.any():
            raise RuntimeError("warm_up before any session joins: it advances every slot")
        self._state, *_ = _step(
            self._models,
            self._leaves,
            self._state,
            self.sampling,
            jnp.zeros((self.slots, self.frame_size), jnp.float32),
        )
        jax.block_until_ready(self._state)
        self._latencies.clear()

    def latency_ms(self) -> dict[str, float]:
        """Per-frame wall time (step + results on the host) over the recent frames, in ms:
        p50, p95, p99, mean, and the number of frames (the first one includes compiling)."""
        if not self._latencies:
            return {}
        ms = np.asarray(self._latencies)
        p50, p95, p99 = (float(x) for x in np.percentile(ms, [50, 95, 99]))
        return {"p50": p50, "p95": p95, "p99": p99, "mean": float(ms.mean()), "frames": ms.size}
