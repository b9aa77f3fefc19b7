"""Onset probabilities: the start chance over a window, the model's channel held silent."""

from __future__ import annotations

import numpy as np
import pytest

from sfm.data.dialogues import USER, Event
from sfm.eval.onset import onset_probabilities, silence_codes, start_probability
from sfm.lm.layout import TEXT_EPAD, TEXT_PAD, StreamLayout, moshi_delays

K, RATE, FRAMES, SILENT = 4, 50.0, 200, 7
LAYOUT = StreamLayout(n_q=K, delays=moshi_delays(K))


def _dialogue() -> dict[str, np.ndarray]:
    """The assistant silent but for a reply over frames [65, 100) (its text too)."""
    rng = np.random.default_rng(0)
    codes = np.full((2, K, FRAMES), SILENT, np.int16)
    codes[0, :, 65:100] = rng.integers(10, 20, (K, 35))
    codes[1] = rng.integers(0, 64, (K, FRAMES))
    text = np.full((2, FRAMES), TEXT_PAD, np.int32)
    text[0, 64], text[0, 65:100:5] = TEXT_EPAD, 42
    return {"codes": codes, "text": text}


def test_silence_codes_are_the_most_frequent_column() -> None:
    codes = np.array([[1, 5, 1, 1], [2, 6, 2, 2]])
    np.testing.assert_array_equal(silence_codes(codes), [1, 2])


def test_start_probability() -> None:
    p_pad = np.array([0.5, 0.9, 0.8, 1.0])
    assert start_probability(p_pad, 1, 2) == pytest.approx(1 - 0.9 * 0.8)
    assert start_probability(p_pad, 3, 5) == 0.0


def test_turn_ends_held_silent_pauses_as_they_are() -> None:
    """A stand-in LM pads with 0.9 where its text is padding and its semantic codes are
    silence, 0.5 elsewhere: the turn end's window reads 0.9 throughout (the reply at frame
    65 held back), the pause's 0.9 as the data has it."""

    def p_pad(delayed_st: np.ndarray) -> np.ndarray:
        silent = (delayed_st[0] == TEXT_PAD) & (delayed_st[1] == SILENT)  # text, codebook 0
        return np.where(silent, 0.9, 0.5)

    events = [
        Event("turn_end", USER, 1.0, 1.3),  # frame 50, reply at 65
        Event("turn_end", USER, 1.0, 0.9),  # a reply overlapping the turn end: left out
        Event("pause", USER, 2.4, 3.2),  # frame 120, nobody talking
        Event("backchannel", USER, 1.5, 1.7),
    ]
    out = onset_probabilities(p_pad, _dialogue(), events, LAYOUT, RATE)
    assert out["turn_end"] == [pytest.approx(1 - 0.9**35)]
    assert out["pause"] == [pytest.approx(1 - 0.9**30)]
    unheld = p_pad(np.concatenate([_dialogue()["text"][:1], _dialogue()["codes"][0, :1]]))
    assert start_probability(unheld, 50, 35) > out["turn_end"][0]  # the reply, held back
