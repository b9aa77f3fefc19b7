"""How ready a duplex LM is to start speaking: after the user's turn ends, and in the user's
pauses, read from its text distribution on a tokenized dialogue.

Teacher-forced on the dialogue, the LM gives P(text token of frame t = padding | the delayed
tokens of the frames before t); one minus it is the chance that its text leaves the padding
at t (an end-of-padding token: a word starts on the next frame). For a turn end answered
after it, the model's streams over the window after the turn end are replaced by padding and
the channel's silence codes (its most frequent code column) before delaying, so that every
frame there reads "nobody has answered yet", as at inference until the model starts. Pauses
are read as the dialogue has them (the assistant is silent through them). The start
probability over a window is 1 - prod(P(pad)), the chance that text sampled at temperature 1
without top-k starts a word in it with the model's audio held silent. A model that answers
turn ends and waits through pauses scores near 1 on the first and near 0 on the second; one
that starts only once its own audio has (as when speech engines pad a reply with quiet noise
that the codec hears) scores 0 on both, whatever its turn-taking through the engine.

    lm = LMTask().build_model(cfg)  # with its trained weights
    dialogue_onsets(lm, "tokens/dialogues/validation-00000-of-00001.array_record",
                    "corpus/dialogues")  # {"turn_end": 0.98, "pause": 0.003, ...}
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfm.data.dialogues import Event
from sfm.data.tokenize import read_shard
from sfm.eval.duplex import read_events
from sfm.lm.layout import StreamLayout, delay_streams, to_streams

# The dialogues' replies start at most 0.7 s after the turn end, their first word 10 ms into
# the reply, its end-of-padding token a frame before: all inside 0.75 s.
TURN_WINDOW_S = 0.75
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
) -> dict[str, list[float]]:
    """Start probabilities of one tokenized dialogue (`sfm.data.tokenize.read_record`): per
    turn end answered after it, within `TURN_WINDOW_S` with the model's channel held silent
    there; per pause, within `PAUSE_WINDOW_S` of its start as the dialogue has it."""
    tokens, mask = to_streams(record, layout)
    length, rate = tokens.shape[1], float(record["frame_rate"])

    def probabilities(tokens_st: np.ndarray) -> np.ndarray:
        return p_pad(delay_streams(tokens_st, mask, layout)[0][:, :length])

    out: dict[str, list[float]] = {"turn_end": [], "pause": []}
    as_is: np.ndarray | None = None
    silence = silence_codes(tokens[layout.model_audio])
    for e in events:
        first = int(e.start * rate)
        if e.kind == "pause":
            as_is = probabilities(tokens) if as_is is None else as_is
            out["pause"].append(start_probability(as_is, first, round(PAUSE_WINDOW_S * rate)))
        elif e.kind == "turn_end" and e.end > e.start:  # replies overlapping it: not asked
            frames = round(TURN_WINDOW_S * rate)
            held = tokens.copy()
            held[0, first : first + frames] = layout.text_pad
            held[layout.model_audio, first : first + frames] = silence[:, None]
            out["turn_end"].append(start_probability(probabilities(held), first, frames))
    return out


def lm_pad_probabilities(lm: nnx.Module) -> PadProbabilities:
    """P(text pad) per frame from one forward pass of `lm` (`sfm.lm.model.LM`)."""
    pad = lm.cfg.layout.text_pad
    forward = nnx.jit(lambda m, x: jax.nn.softmax(m(x).text_logits.astype(jnp.float32), -1))
    return lambda tokens_st: np.asarray(forward(lm, jnp.asarray(tokens_st[None]))[0, :, pad])


def dialogue_onsets(
    lm: nnx.Module,
    shard: str | PathLike[str],
    dialogues: str | PathLike[str],
    limit: int | None = None,
) -> dict[str, float]:
    """Mean start probabilities of `lm` over the first `limit` dialogues of a tokenized shard,
    their events read beside the audio each record names under `dialogues`: keys turn_end
    and pause (NaN without such events), and their counts."""
    p_pad, layout = lm_pad_probabilities(lm), lm.cfg.layout
    found: dict[str, list[float]] = {"turn_end": [], "pause": []}
    for record in itertools.islice(read_shard(shard), limit):
        wav = Path(dialogues) / record["path"]
        events = read_events(wav.with_name(wav.stem + ".events.json"))
        for kind, values in onset_probabilities(p_pad, record, events, layout).items():
            found[kind] += values
    means = {k: float(np.mean(v)) if v else float("nan") for k, v in found.items()}
    return means | {f"{k}_events": len(v) for k, v in found.items()}
