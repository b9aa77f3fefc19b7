"""The LM's stream layout: [text, K model codebooks, K user codebooks], delays, loss masks.

One owner for the layout that the model defines and the data code builds records in: token
constants, delays (validated here), delay/undelay of single records (numpy) and of batches
(jax.numpy, imported on use so that config loading stays free of jax), the record format.

Conventions (Moshi, REFERENCE §2):
- stream 0 is the aligned text (TEXT_PAD=3 fills gaps, TEXT_EPAD=0 marks the frame before a word);
- streams 1..K are the model's (assistant's) codebooks, K+1..2K the user's;
- token ``ignore`` (-1) is the "zero embedding": an absent input that the LM embeds as zeros;
- token ``INITIAL`` (-2) fills the first ``delay`` frames of a delayed stream, as the initial
  token the LM also sees before its first frame (Moshi's convention);
The loss mask covers only the model's streams (text + model codebooks) where they hold real
tokens; the user's streams are inputs and never carry loss.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TEXT_EPAD = 0  # end of padding: "a word starts on the next frame" (Moshi's id)
TEXT_PAD = 3  # nothing said on this frame (Moshi's id)
IGNORE = -1  # the "zero embedding": an absent input, never a loss target
INITIAL = -2  # the stream's initial token: fills the frames before a delayed stream starts


def moshi_delays(n_q: int, acoustic_delay: int = 1) -> tuple[int, ...]:
    """Moshi delays: text and semantic codebooks undelayed, acoustic codebooks shifted."""
    side = (0,) + (acoustic_delay,) * (n_q - 1)
    return (0,) + side + side


def check_delays(delays: Sequence[int], n_q: int, key: str = "delays") -> None:
    """Raise ValueError naming `key` unless `delays` has one entry >= 0 per stream."""
    n_streams = 1 + 2 * n_q
    if len(delays) != n_streams:
        raise ValueError(
            f"{key}: {len(delays)} entries, expected {n_streams} (1 text + 2 x n_q={n_q} codebooks)"
        )
    if min(delays) < 0:
        raise ValueError(f"{key}: must be >= 0, got {list(delays)}")


@dataclass(frozen=True)
class StreamLayout:
    """Which stream holds what, and how far each stream is delayed (in frames)."""

    n_q: int = 8
    delays: tuple[int, ...] = (0,) + (0,) + (1,) * 7 + (0,) + (1,) * 7
    text_pad: int = TEXT_PAD
    text_epad: int = TEXT_EPAD
    ignore: int = IGNORE

    def __post_init__(self) -> None:
        check_delays(self.delays, self.n_q)

    @property
    def n_streams(self) -> int:
        """1 text stream + n_q model codebooks + n_q user codebooks."""
        return 1 + 2 * self.n_q

    @property
    def max_delay(self) -> int:
        """Largest delay: apply_delays lengthens sequences by this many frames."""
        return max(self.delays)

    @property
    def model_audio(self) -> slice:
        """Streams of the model's codebooks."""
        return slice(1, 1 + self.n_q)

    @property
    def user_audio(self) -> slice:
        """Streams of the user's codebooks."""
        return slice(1 + self.n_q, 1 + 2 * self.n_q)

    @property
    def audio(self) -> slice:
        """All codebook streams (model then user)."""
        return slice(1, 1 + 2 * self.n_q)


def apply_delays(tokens_st: np.ndarray, delays: tuple[int, ...], fill: int) -> np.ndarray:
    """Shift stream s right by delays[s]; output is [S, T + max(delays)], padded with fill."""
    n_streams, length = tokens_st.shape
    if len(delays) != n_streams:
        raise ValueError(f"{len(delays)} delays for {n_streams} streams")
    out = np.full((n_streams, length + max(delays)), fill, dtype=tokens_st.dtype)
    for s, d in enumerate(delays):
        out[s, d : d + length] = tokens_st[s]
    return out


def undo_delays(tokens_st: np.ndarray, delays: tuple[int, ...]) -> np.ndarray:
    """Inverse of apply_delays: [S, T + max(delays)] -> [S, T]."""
    length = tokens_st.shape[1] - max(delays)
    return np.stack([tokens_st[s, d : d + length] for s, d in enumerate(delays)])


def delay(codes_bst: Any, delays: Sequence[int], fill: int = INITIAL) -> Any:
    """Batched, same-length delay (jax): stream s of [B, S, T] shifted right by delays[s]
    frames; its first frames get `fill` and its last delays[s] frames drop off."""
    import jax.numpy as jnp

    t = codes_bst.shape[2]
    out = []
    for s, d in enumerate(delays):
        row = codes_bst[:, s]
        if d:
            row = jnp.concatenate([jnp.full_like(row[:, :d], fill), row[:, : t - d]], axis=1)
        out.append(row)
    return jnp.stack(out, axis=1)


def undelay(x_bst: Any, delays: Sequence[int]) -> tuple[Any, Any]:
    """Inverse of `delay` on any [B, S, T, ...] jax array: (values, valid [B, S, T]).

    Frame t of stream s is read from delayed frame t + delays[s]; the last delays[s] frames
    have no source and are marked invalid (their values are zeros)."""
    import jax.numpy as jnp

    b, _, t = x_bst.shape[:3]
    vals, valid = [], []
    for s, d in enumerate(delays):
        row = x_bst[:, s]
        if d:
            row = jnp.concatenate([row[:, d:], jnp.zeros_like(row[:, :d])], axis=1)
        vals.append(row)
        valid.append(jnp.arange(t) < t - d)
    mask = jnp.broadcast_to(jnp.stack(valid)[None], (b, len(delays), t))
    return jnp.stack(vals, axis=1), mask


def decode_record(data: bytes) -> dict[str, Any]:
    """Bytes of an np.savez record -> dict of arrays (codes [C, K, T], text [C, T], ...)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def encode_record(arrays: Mapping[str, Any]) -> bytes:
    """Dict of arrays -> np.savez bytes (the inverse of decode_record)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def to_streams(record: Mapping[str, Any], layout: StreamLayout) -> tuple[np.ndarray, np.ndarray]:
    """A record -> (tokens int32 [S, T], loss mask bool [S, T]), undelayed.

    Mono (C=1): text + model codebooks get the utterance, user streams are ``ignore``.
    Dialogue (C=2, [assistant, user]): channel 0 -> text + model codebooks, channel 1 -> user.
    """
    codes_ckt = np.asarray(record["codes"])
    text_ct = np.asarray(record["text"])
    n_ch, n_cb, length = codes_ckt.shape
    if n_ch not in (1, 2) or n_cb < layout.n_q or text_ct.shape != (n_ch, length):
        raise ValueError(f"bad record shapes codes {codes_ckt.shape} text {text_ct.shape}")
    tokens = np.full((layout.n_streams, length), layout.ignore, dtype=np.int32)
    tokens[0] = text_ct[0]
    tokens[layout.model_audio] = codes_ckt[0, : layout.n_q]
    if n_ch == 2:
        tokens[layout.user_audio] = codes_ckt[1, : layout.n_q]
    mask = np.zeros(tokens.shape, dtype=bool)
    mask[: 1 + layout.n_q] = True
    return tokens, mask


def text_to_streams(tokens_t: np.ndarray, layout: StreamLayout) -> tuple[np.ndarray, np.ndarray]:
    """Text-only sequence -> (tokens [S, T], mask [S, T]): every audio stream is ``ignore``."""
    tokens = np.full((layout.n_streams, len(tokens_t)), layout.ignore, dtype=np.int32)
    tokens[0] = tokens_t
    mask = np.zeros(tokens.shape, dtype=bool)
    mask[0] = True
    return tokens, mask


def word_starts(text_t: np.ndarray, layout: StreamLayout) -> np.ndarray:
    """Span boundaries for interleaving: frame 0 and every TEXT_EPAD frame."""
    epads = np.flatnonzero(text_t == layout.text_epad)
    return np.unique(np.concatenate([[0], epads])).astype(np.int64)


def interleave(
    tokens_st: np.ndarray,
    mask_st: np.ndarray,
    layout: StreamLayout,
    rng: np.random.Generator,
    p_text: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Switch modality at word boundaries; each span is "text" with probability p_text.

    "text" spans: every audio stream -> ``ignore`` (no audio loss), text kept with loss.
    "speech" spans: audio kept, text stream -> TEXT_PAD with no text loss.
    """
    tokens, mask = tokens_st.copy(), mask_st.copy()
    starts = word_starts(tokens[0], layout)
    ends = np.append(starts[1:], tokens.shape[1])
    for start, end, is_text in zip(starts, ends, rng.random(len(starts)) < p_text):
        if is_text:
            tokens[layout.audio, start:end] = layout.ignore
            mask[layout.audio, start:end] = False
        else:
            tokens[0, start:end] = layout.text_pad
            mask[0, start:end] = False
    return tokens, mask


def delay_streams(
    tokens_st: np.ndarray, mask_st: np.ndarray, layout: StreamLayout
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the layout's delays: a stream's first ``delay`` frames hold ``INITIAL``, its
    tail beyond the sequence ``ignore``; the mask is False on both."""
    tokens = apply_delays(tokens_st, layout.delays, layout.ignore)
    for s, d in enumerate(layout.delays):
        tokens[s, :d] = INITIAL
    mask = apply_delays(mask_st, layout.delays, False)
    return tokens, mask


def crop_or_pad(
    tokens_st: np.ndarray, mask_st: np.ndarray, seq_len: int, ignore: int, start: int
) -> dict[str, np.ndarray]:
    """Window [start, start + seq_len); short items are padded with ``ignore`` / mask False."""
    tokens = np.full((tokens_st.shape[0], seq_len), ignore, dtype=np.int32)
    mask = np.zeros((tokens_st.shape[0], seq_len), dtype=bool)
    window_t = tokens_st[:, start : start + seq_len]
    tokens[:, : window_t.shape[1]] = window_t
    mask[:, : window_t.shape[1]] = mask_st[:, start : start + seq_len]
    return {"tokens": tokens, "mask": mask}
