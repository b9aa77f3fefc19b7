"""Onset probabilities: the start chance over a window, the model's channel held silent."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfm.config import load_config, resolve_preset
from sfm.data.dialogues import USER, Event
from sfm.data.tokenize import read_record, record_bytes, write_shard
from sfm.eval.onset import (
    dialogue_onsets,
    lm_pad_probabilities,
    onset_probabilities,
    silence_codes,
    start_probability,
)
from sfm.lm.layout import TEXT_EPAD, TEXT_PAD, StreamLayout, delay_streams, moshi_delays, to_streams
from sfm.lm.model import LM

K, RATE, FRAMES, SILENT = 4, 50.0, 200, 7
LAYOUT = StreamLayout(n_q=K, delays=moshi_delays(K))
EVENTS = [
    Event("turn_end", USER, 1.0, 1.3),  # frame 50, the reply at 65
    Event("turn_end", USER, 1.0, 0.9),  # a reply overlapping the turn end: left out
    Event("pause", USER, 2.4, 3.2),  # frame 120, the assistant silent
    Event("backchannel", USER, 1.5, 1.7),
]


def _dialogue() -> dict[str, object]:
    """The assistant silent but for a reply over frames [65, 100) (its text too)."""
    rng = np.random.default_rng(0)
    codes = np.full((2, K, FRAMES), SILENT, np.int16)
    codes[0, :, 65:100] = rng.integers(10, 20, (K, 35))
    codes[1] = rng.integers(0, 64, (K, FRAMES))
    text = np.full((2, FRAMES), TEXT_PAD, np.int32)
    text[0, 64], text[0, 65:100:5] = TEXT_EPAD, 42
    return read_record(record_bytes(codes, text, RATE, "wav/d.wav"))


def test_silence_codes_are_the_most_frequent_column() -> None:
    codes = np.array([[1, 5, 1, 1], [2, 6, 2, 2]])
    np.testing.assert_array_equal(silence_codes(codes), [1, 2])


def test_start_probability() -> None:
    p_pad = np.array([0.5, 0.9, 0.8, 1.0])
    assert start_probability(p_pad, 1, 2) == pytest.approx(1 - 0.9 * 0.8)
    assert start_probability(p_pad, 3, 5) == 0.0


def _stand_in(delayed_st: np.ndarray) -> np.ndarray:
    """P(pad) 0.9 where the model's text is padding and its codes (semantic, undelayed, and
    the first acoustic, a frame late) are silence, 0.5 elsewhere; the user's codes ignored."""
    acoustic = np.roll(delayed_st[2], -1)  # frame t's acoustic code sits at t + 1
    silent = (delayed_st[0] == TEXT_PAD) & (delayed_st[1] == SILENT) & (acoustic == SILENT)
    return np.where(silent, 0.9, 0.5)


def test_turn_ends_held_silent_pauses_as_they_are() -> None:
    """The turn end's window (38 frames from frame 50) reads 0.9 throughout, the reply at
    frame 65 held back on every model stream, delayed or not; the pause's 30 frames 0.9."""
    out = onset_probabilities(_stand_in, _dialogue(), EVENTS, LAYOUT)
    assert out == {"turn_end": [pytest.approx(1 - 0.9**38)], "pause": [pytest.approx(1 - 0.9**30)]}
    tokens, mask = to_streams(_dialogue(), LAYOUT)
    as_is = _stand_in(delay_streams(tokens, mask, LAYOUT)[0][:, :FRAMES])
    assert start_probability(as_is, 50, 38) > 1 - 0.9**37  # the reply, had it not been held


def test_dialogue_onsets_of_an_lm(tmp_path: Path) -> None:
    """From a shard and the dialogues' events files, through a tiny LM's forward pass."""
    cfg = load_config(resolve_preset("tiny", "lm"))
    lm = LM(cfg.lm, rngs=nnx.Rngs(0))
    record = _dialogue()
    codes = np.asarray(record["codes"]) % cfg.lm.card
    data = record_bytes(codes, np.asarray(record["text"]) % cfg.lm.text_card, RATE, "wav/d.wav")
    write_shard(tmp_path / "shard.array_record", [data] * 2)
    (tmp_path / "wav").mkdir()
    rows = [e.__dict__ for e in EVENTS]
    (tmp_path / "wav" / "d.events.json").write_text(json.dumps({"events": rows}))

    tokens, mask = to_streams(read_record(data), cfg.lm.layout)
    delayed = delay_streams(tokens, mask, cfg.lm.layout)[0][:, :FRAMES]
    logits = lm(jnp.asarray(delayed[None])).text_logits[0]
    expected = jax.nn.softmax(logits.astype(jnp.float32), -1)[:, TEXT_PAD]
    np.testing.assert_allclose(lm_pad_probabilities(lm)(delayed), expected, rtol=1e-6)

    out = dialogue_onsets(lm, tmp_path / "shard.array_record", tmp_path)
    one = onset_probabilities(lm_pad_probabilities(lm), read_record(data), EVENTS, cfg.lm.layout)
    assert out == {
        "turn_end": pytest.approx(one["turn_end"][0]),
        "pause": pytest.approx(one["pause"][0]),
        "turn_end_events": 2,
        "pause_events": 2,
    }
