"""Random tokenized records in the LM's record layout (`sfm.data.tokenize.write_shard` writes
them to ArrayRecord shards)."""

from __future__ import annotations

import numpy as np

from sfm.lm.layout import TEXT_EPAD, TEXT_PAD, encode_record

FRAME_RATE = 12.5


def speech_record(
    rng: np.random.Generator,
    channels: int,
    frames: int,
    *,
    n_q: int = 8,
    card: int = 2048,
    text_vocab: int = 100,
    p_pad: float = 0.3,
    p_epad: float = 0.15,
    path: str | None = None,
) -> bytes:
    """One record as `sfm data tokenize` writes it: codes int16 [C, n_q, T] below `card`,
    text int32 [C, T] of ids in [4, text_vocab) with TEXT_PAD gaps and TEXT_EPAD word marks."""
    text = rng.integers(4, text_vocab, size=(channels, frames)).astype(np.int32)
    text[rng.random(text.shape) < p_pad] = TEXT_PAD
    text[rng.random(text.shape) < p_epad] = TEXT_EPAD
    codes = rng.integers(0, card, size=(channels, n_q, frames)).astype(np.int16)
    record = {"codes": codes, "text": text, "frame_rate": FRAME_RATE}
    if path is not None:
        record["path"] = path
    return encode_record(record)
