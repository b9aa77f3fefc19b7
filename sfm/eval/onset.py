"""How ready a duplex LM is to start speaking: after the user's turn ends, and in the user's
pauses, read from its text distribution on a dialogue with its own channel held silent.

Teacher-forced on a tokenized dialogue, the LM gives each frame's probability of the padding
token; one minus it is the chance a word starts there. From an event on, the model's streams
are replaced by padding and the channel's silence codes (its most frequent code column), so
each frame reads as "nobody has answered yet", what the model sees at inference until it
starts. The start probability over a window is 1 - prod(P(pad)). A model that answers turn
ends and waits through pauses scores near 1 on the first and near 0 on the second; one that
only starts once its own audio has (as when speech engines pad a reply with quiet noise that
the codec hears) scores 0 on both, whatever its turn-taking through the engine.

    probs = onset_probabilities(p_pad_fn, record, events, layout)
    np.mean(probs["turn_end"]), np.mean(probs["pause"])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from sfm.data.dialogues import Event
from sfm.lm.layout import StreamLayout, delay_streams, to_streams

TURN_WINDOW_S = 0.7  # the dialogues' replies start at most 0.7 s after the turn end
PAUSE_WINDOW_S = 0.6  # the dialogues' pauses last at least 0.6 s

# delayed tokens [S, T] -> P(text pad) per frame [T]
PadProbabilities = Callable[[np.ndarray], np.ndarray]


def silence_codes(codes_kt: np.ndarray) -> np.ndarray:
    """The channel's most frequent code column [K]: its codes for silence."""
    columns, counts = np.unique(codes_kt.T, axis=0, return_counts=True)
    return columns[counts.argmax()]


def start_probability(p_pad_t: np.ndarray, start: int, frames: int) -> float:
    """The chance a word starts in frames [start, start + frames): 1 - prod(P(pad))."""
    return float(1.0 - np.prod(p_pad_t[start : start + frames]))


def onset_probabilities(
    p_pad: PadProbabilities,
    record: Mapping[str, Any],
    events: Sequence[Event],
    layout: StreamLayout,
    frame_rate: float,
) -> dict[str, list[float]]:
    """Start probabilities of one tokenized dialogue: per turn end (replies starting after
    it) within `TURN_WINDOW_S`, the model's channel held silent from the turn end; per pause
    within `PAUSE_WINDOW_S` of its start (the model is silent there in the data)."""
    tokens, mask = to_streams(record, layout)
    length = tokens.shape[1]

    def probabilities(tokens_st: np.ndarray) -> np.ndarray:
        return p_pad(delay_streams(tokens_st, mask, layout)[0][:, :length])

    out: dict[str, list[float]] = {"turn_end": [], "pause": []}
    as_is: np.ndarray | None = None
    silence = silence_codes(tokens[layout.model_audio])
    for e in events:
        first = int(e.start * frame_rate)
        if e.kind == "pause":
            as_is = probabilities(tokens) if as_is is None else as_is
            out["pause"].append(start_probability(as_is, first, int(PAUSE_WINDOW_S * frame_rate)))
        elif e.kind == "turn_end" and e.end > e.start:  # replies overlapping it: not asked
            frames = int(TURN_WINDOW_S * frame_rate)
            held = tokens.copy()
            held[0, first : first + frames] = layout.text_pad
            held[layout.model_audio, first : first + frames] = silence[:, None]
            out["turn_end"].append(start_probability(probabilities(held), first, frames))
    return out
