"""Text stream placement (REFERENCE §4) with hand-computed expectations."""

from __future__ import annotations

import numpy as np

from sfm.data.text_stream import place_words, start_frame, text_stream
from sfm.lm.layout import TEXT_EPAD as E
from sfm.lm.layout import TEXT_PAD as P

VOCAB = {"a": [10], "bb": [20, 21], "ccc": [30, 31, 32], "": []}


def enc(word: str) -> list[int]:
    """Toy tokenizer: one token per letter."""
    return VOCAB[word]


def test_start_frame_is_ceil() -> None:
    assert start_frame(0.0, 12.5) == 0
    assert start_frame(0.08, 12.5) == 1  # exactly frame 1, not 2 from float error
    assert start_frame(0.081, 12.5) == 2
    assert start_frame(0.1, 50) == 5


def test_words_with_gaps_get_epad_before() -> None:
    # fr 10: "a" at 0.15 -> frame 2, "bb" at 0.5 -> frames 5, 6
    got = text_stream([("a", 0.15, 0.2), ("bb", 0.5, 0.7)], 8, 10.0, enc)
    np.testing.assert_array_equal(got, [P, E, 10, P, E, 20, 21, P])
    assert got.dtype == np.int32


def test_word_at_frame_zero_has_no_epad() -> None:
    got = text_stream([("bb", 0.0, 0.1)], 4, 10.0, enc)
    np.testing.assert_array_equal(got, [20, 21, P, P])


def test_overlapping_word_is_shifted_not_lost() -> None:
    # "ccc" at frame 1 takes 1..3; "bb" wants frame 2, so it goes to 4..5, no pad before it
    got = text_stream([("ccc", 0.1, 0.2), ("bb", 0.2, 0.3)], 7, 10.0, enc)
    np.testing.assert_array_equal(got, [E, 30, 31, 32, 20, 21, P])


def test_adjacent_word_has_no_epad() -> None:
    got = text_stream([("a", 0.1, 0.2), ("a", 0.2, 0.3)], 4, 10.0, enc)
    np.testing.assert_array_equal(got, [E, 10, 10, P])


def test_tokens_past_the_end_are_dropped_and_counted() -> None:
    got, dropped = place_words([("ccc", 0.3, 0.4), ("bb", 0.45, 0.5)], 5, 10.0, enc)
    np.testing.assert_array_equal(got, [P, P, E, 30, 31])
    assert dropped == 3  # one of "ccc", both of "bb"


def test_empty_words_and_no_words() -> None:
    np.testing.assert_array_equal(text_stream([("", 0.1, 0.2)], 3, 10.0, enc), [P, P, P])
    np.testing.assert_array_equal(text_stream([], 2, 10.0, enc), [P, P])
