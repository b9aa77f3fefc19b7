"""Word-aligned text stream: one text token (or pad) per codec frame, Moshi's placement.

A word's tokens start at frame ceil(start * frame_rate); a word whose frame is still taken by
the previous word's tokens is shifted right so no token is lost. Frames without a token hold
TEXT_PAD, except the pad right before a word's first token, which becomes TEXT_EPAD (end of
padding). Tokens that would fall past the last frame are dropped and counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from sfm.lm.layout import TEXT_EPAD, TEXT_PAD

TimedWord = tuple[str, float, float]  # word, start_s, end_s


def start_frame(start_s: float, frame_rate: float) -> int:
    """The first frame of a word starting at `start_s` seconds."""
    return max(0, math.ceil(round(start_s * frame_rate, 6)))  # round: 0.1 * 50 is not 5.000001


def place_words(
    words: Sequence[TimedWord],
    n_frames: int,
    frame_rate: float,
    encode: Callable[[str], list[int]],
) -> tuple[np.ndarray, int]:
    """Text stream int32 [n_frames] and the number of tokens dropped past the end."""
    stream = np.full(n_frames, TEXT_PAD, np.int32)
    free, dropped = 0, 0  # free: first frame not yet taken by a token
    for word, start_s, _ in words:
        tokens = encode(word)
        if not tokens:
            continue
        first = max(start_frame(start_s, frame_rate), free)
        kept = tokens[: max(0, n_frames - first)]
        dropped += len(tokens) - len(kept)
        if not kept:
            continue
        if first > free:  # the frame before is a pad: it announces the word
            stream[first - 1] = TEXT_EPAD
        stream[first : first + len(kept)] = kept
        free = first + len(kept)
    return stream, dropped


def text_stream(
    words: Sequence[TimedWord],
    n_frames: int,
    frame_rate: float,
    encode: Callable[[str], list[int]],
) -> np.ndarray:
    """Text stream int32 [n_frames] of `words` (see the module docstring for the rules)."""
    return place_words(words, n_frames, frame_rate, encode)[0]
