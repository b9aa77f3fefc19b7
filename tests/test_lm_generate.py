"""Streaming generation: equal to the offline LM (both depth kinds, stacked and per-layer
parameters), deterministic, per-session, resettable, one compile per step function."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfm.lm.config import DepthConfig, LMConfig, TemporalConfig, moshi_delays
from sfm.lm.generate import Generator, GenState, SamplingConfig, generate
from sfm.lm.layout import IGNORE, INITIAL, delay
from sfm.lm.model import LM

TEMPORAL = TemporalConfig(
    dim=64, num_heads=4, num_layers=2, dim_feedforward=256, context=32, remat="none"
)
DEPTHS = {
    "moshi": DepthConfig(dim=32, num_heads=2, num_layers=2, dim_feedforward=128),
    "csm": DepthConfig(
        kind="csm", max_period=10000.0, dim=32, num_heads=2, num_layers=2, dim_feedforward=128
    ),
}
FRAMES = 44  # more than the temporal context: the KV ring wraps
GREEDY = SamplingConfig(greedy=True)
SAMPLED = SamplingConfig()


PER_LAYER = "moshi_per_layer"  # the moshi kind with lm.{temporal,depth}.scan_layers false
KINDS = [*DEPTHS, PER_LAYER]


def _cfg(kind: str) -> LMConfig:
    if kind == PER_LAYER:
        return _cfg("moshi").with_scan_layers(False)
    return LMConfig(
        text_card=50, card=32, n_q=4, dep_q=4, delays=moshi_delays(4), temporal=TEMPORAL,
        depth=DEPTHS[kind],
    )  # fmt: skip


@pytest.fixture(scope="module")
def models() -> dict[str, LM]:
    return {kind: LM(_cfg(kind), rngs=nnx.Rngs(0)) for kind in KINDS}


def _user(batch: int, frames: int, seed: int = 0) -> np.ndarray:
    """User codes [B, n_q, T] with a stretch of absent (-1) frames in item 0."""
    codes = np.random.default_rng(seed).integers(0, 32, (batch, 4, frames)).astype(np.int32)
    codes[0, :, 5:8] = IGNORE
    return codes


def _steps(gen: Generator, state: GenState, user_bkt: np.ndarray) -> tuple[Any, ...]:
    """Step over every frame: (state, tokens [B, 1 + dep_q, T], valid [B, T])."""
    outs, valids = [], []
    for t in range(user_bkt.shape[2]):
        state, out, valid = gen.step(state, user_bkt[:, :, t])
        outs.append(np.asarray(out))
        valids.append(np.asarray(valid))
    return state, np.stack(outs, axis=2), np.stack(valids, axis=1)


@pytest.fixture(scope="module")
def greedy_runs(models: dict[str, LM]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Greedy streaming of both depth kinds over FRAMES frames: (user, tokens, valid)."""
    user = _user(2, FRAMES)
    runs = {}
    for kind, model in models.items():
        gen = Generator(model, GREEDY)
        _, out, valid = _steps(gen, gen.init(2, jax.random.key(0)), user)
        runs[kind] = (user, out, valid)
    return runs


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_matches_offline(kind: str, models: dict[str, LM], greedy_runs: dict) -> None:
    """Greedy tokens are the argmax of the teacher-forced logits on the same sequence."""
    model, cfg = models[kind], models[kind].cfg
    user, out, valid = greedy_runs[kind]
    md, frames = cfg.max_delay, FRAMES - cfg.max_delay
    assert not valid[:, :md].any() and valid[:, md:].all()
    assert (out[:, :, :md] == INITIAL).all()
    # Frame t of the model is emitted at step t + max_delay; the user's frame t + 1 sits next
    # to it in the training layout (LMGen reads the user's frame t at step t).
    undelayed = np.concatenate([out[:, :, md:], user[:, :, 1 : frames + 1]], axis=1)
    tokens = delay(jnp.asarray(undelayed), cfg.delays)
    logits = nnx.jit(lambda m, x: m(x))(model, tokens)
    tokens = np.asarray(tokens)
    text = np.asarray(jnp.argmax(logits.text_logits, -1))
    audio = np.asarray(jnp.argmax(logits.audio_logits, -1))
    np.testing.assert_array_equal(text, tokens[:, 0])
    for k in range(cfg.dep_q):
        d = cfg.delays[1 + k]  # earlier positions hold the initial token
        np.testing.assert_array_equal(audio[:, d:, k], tokens[:, 1 + k, d:], err_msg=f"cb {k}")
    assert len(np.unique(out[:, 1:, md:])) > 8  # not a constant output


def test_generate_and_run_match_steps(models: dict[str, LM], greedy_runs: dict) -> None:
    """`generate` (one scan, user padded with -1) equals the step loop fed the same frames."""
    model = models["moshi"]
    md = model.cfg.max_delay
    user, out, _ = greedy_runs["moshi"]
    frames = FRAMES - md
    padded = user.copy()
    padded[:, :, frames:] = IGNORE
    gen = Generator(model, GREEDY)
    _, ref, _ = _steps(gen, gen.init(2, jax.random.key(0)), padded)
    got = np.asarray(generate(model, user[:, :, :frames], GREEDY, jax.random.key(1)))
    assert got.shape == (2, 1 + model.cfg.dep_q, frames)
    np.testing.assert_array_equal(got, ref[:, :, md:])
    np.testing.assert_array_equal(ref[:, :, : frames - 1], out[:, :, : frames - 1])


@pytest.fixture(scope="module", params=["moshi", PER_LAYER])
def sampled(request: pytest.FixtureRequest, models: dict[str, LM]) -> Generator:
    return Generator(models[request.param], SAMPLED)


def test_deterministic_given_key(sampled: Generator) -> None:
    user = _user(3, 12)
    runs = [_steps(sampled, sampled.init(3, jax.random.key(k)), user)[1] for k in (7, 7, 8)]
    np.testing.assert_array_equal(runs[0], runs[1])
    md = sampled.cfg.max_delay
    assert (runs[0][:, :, md:] != runs[2][:, :, md:]).mean() > 0.5


def test_sessions_are_independent(sampled: Generator) -> None:
    """Session 0 alone equals session 0 in a batch of 3 with other user inputs."""
    user = _user(3, 12, seed=1)
    _, alone, _ = _steps(sampled, sampled.init(1, jax.random.key(3)), user[:1])
    _, batch, _ = _steps(sampled, sampled.init(3, jax.random.key(3)), user)
    np.testing.assert_array_equal(alone[0], batch[0])
    assert (batch[1] != batch[0]).any() and (batch[2] != batch[1]).any()


def test_reset_restarts_one_session(sampled: Generator) -> None:
    """After resetting session 1 at frame 6 and replaying its input, it repeats its first six
    frames; sessions 0 and 2 go on as if nothing happened."""
    user = _user(3, 12, seed=2)
    _, ref, _ = _steps(sampled, sampled.init(3, jax.random.key(5)), user)
    state, first, _ = _steps(sampled, sampled.init(3, jax.random.key(5)), user[:, :, :6])
    state = sampled.reset(state, np.array([False, True, False]))
    np.testing.assert_array_equal(np.asarray(state.offset), [6, 0, 6])
    replay = user[:, :, 6:].copy()
    replay[1] = user[1, :, :6]
    state, second, valid = _steps(sampled, state, replay)
    np.testing.assert_array_equal(second[1], first[1])
    assert not valid[1, : sampled.cfg.max_delay].any()
    after = np.concatenate([first, second], axis=2)
    np.testing.assert_array_equal(after[[0, 2]], ref[[0, 2]])
    # A new key: the reset session no longer replays.
    state = sampled.reset(state, np.array([False, True, False]), key=jax.random.key(6))
    _, third, _ = _steps(sampled, state, replay)
    assert (third[1, :, 1:] != first[1, :, 1:]).any()


@pytest.fixture
def compile_events() -> Iterator[list[str]]:
    events: list[str] = []
    watched = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def listen(event: str, duration: float, **kwargs: Any) -> None:
        if event in watched:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield events
    jax.monitoring.unregister_event_duration_listener(listen)


def test_top1_is_greedy_and_compiles_once(
    models: dict[str, LM], greedy_runs: dict, compile_events: list[str]
) -> None:
    gen = Generator(models["moshi"], SamplingConfig(temp=0.8, top_k=1, temp_text=1.5, top_k_text=1))
    user, greedy, _ = greedy_runs["moshi"]
    state = gen.init(2, jax.random.key(11))
    jax.block_until_ready(state)
    compile_events.clear()
    _, out, _ = _steps(gen, state, user[:, :, :10])
    assert sorted(compile_events) == [
        "/jax/core/compile/backend_compile_duration",
        "/jax/core/compile/jaxpr_trace_duration",
    ]
    np.testing.assert_array_equal(out, greedy[:, :, :10])
