"""What a channel says and when: voice activity (silero-vad) and words with their times
(pocketsphinx, whose wheel ships an English model). Both models come inside their wheels.

    speech = listen(audio_t, 24000)      # Speech: VAD segments and ASR words, in seconds
    words = transcribe(audio_t, 24000)   # just the words

ASR runs on each voice-active segment (padded a little) rather than on the whole channel:
faster on conversations that are mostly silence, and a word's time is its segment's offset
plus pocketsphinx's frame (10 ms) count.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from math import gcd
from typing import Any

import numpy as np
from scipy.signal import resample_poly

from sfm.data.synth import FRAME_S, SILENCE_DB, frame_db

ASR_RATE = 16000  # both models read 16 kHz
ASR_PAD_S = 0.15  # audio kept either side of a voice-active segment for the recognizer
_FRAME_S = 0.01  # pocketsphinx's frame
_ALTERNATE = re.compile(r"\(\d+\)$")  # "the(2)": the dictionary's second pronunciation
_NOT_WORDS = {"<s>", "</s>", "<sil>", "[noise]", "<unk>"}


@dataclasses.dataclass(frozen=True)
class Word:
    """A recognized word and its span in seconds."""

    text: str
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class Speech:
    """One channel's voice-active segments [(start, end)] and words, in seconds."""

    segments: tuple[tuple[float, float], ...]
    words: tuple[Word, ...]

    def shifted(self, seconds: float) -> Speech:
        """The same speech `seconds` later."""
        return Speech(
            tuple((a + seconds, b + seconds) for a, b in self.segments),
            tuple(Word(w.text, w.start + seconds, w.end + seconds) for w in self.words),
        )


def to_16k(audio_t: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono float32 at 16 kHz; rejects non-finite samples (they would poison both models)."""
    audio = np.asarray(audio_t, np.float32).reshape(-1)
    if not np.isfinite(audio).all():
        raise ValueError(f"audio has {int((~np.isfinite(audio)).sum())} non-finite samples")
    if sample_rate == ASR_RATE:
        return audio
    g = gcd(ASR_RATE, sample_rate)
    return resample_poly(audio, ASR_RATE // g, sample_rate // g).astype(np.float32)


@functools.cache
def _vad() -> Any:
    from silero_vad import load_silero_vad

    return load_silero_vad()


@functools.cache
def _decoder() -> Any:
    from pocketsphinx import Decoder

    return Decoder(loglevel="FATAL")


def _tightened(audio_16k: np.ndarray, start: float, end: float) -> tuple[float, float]:
    """A segment with its silent edges cut off: silero pads its segments (30 ms) and ends
    them late (its state decays after the voice stops: 60-130 ms measured on cut speech),
    so the edges move to the first and last 10 ms frame within 45 dB of the segment's
    loudest. Frames lie on the recording's 10 ms grid, so that a segment silero starts a
    window (32 ms) earlier or later gets the same edges."""
    hop = int(FRAME_S * ASR_RATE)
    a = int(start * ASR_RATE) // hop * hop
    loud = np.flatnonzero(frame_db(audio_16k[a : int(end * ASR_RATE)], ASR_RATE) > SILENCE_DB)
    if not loud.size:
        return start, end
    return float(a / ASR_RATE + loud[0] * FRAME_S), float(a / ASR_RATE + (loud[-1] + 1) * FRAME_S)


def voice_activity(audio_16k: np.ndarray) -> list[tuple[float, float]]:
    """Speech segments [(start, end)] in seconds of 16 kHz mono audio: silero-vad with its
    defaults (0.5 threshold, segments >= 250 ms, gaps >= 100 ms split them), edges
    tightened to the signal's level."""
    import torch
    from silero_vad import get_speech_timestamps

    if audio_16k.size < ASR_RATE // 10:
        return []
    stamps = get_speech_timestamps(
        torch.from_numpy(np.ascontiguousarray(audio_16k)), _vad(), sampling_rate=ASR_RATE
    )
    return [_tightened(audio_16k, s["start"] / ASR_RATE, s["end"] / ASR_RATE) for s in stamps]


def _recognize(audio_16k: np.ndarray, offset_s: float) -> list[Word]:
    """pocketsphinx's words (fillers and silences dropped) of one stretch of audio."""
    pcm = (np.clip(audio_16k, -1.0, 1.0) * 32767).astype(np.int16).tobytes()
    decoder = _decoder()
    # the feature front end keeps state from the last utterance (cepstral mean and more):
    # reset, so that the same audio always gives the same words at the same times
    decoder.reinit_feat()
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()
    words = []
    for seg in decoder.seg():
        text = _ALTERNATE.sub("", seg.word).lower()
        if text in _NOT_WORDS or text.startswith("+") or text.startswith("["):
            continue
        words.append(
            Word(text, offset_s + seg.start_frame * _FRAME_S, offset_s + seg.end_frame * _FRAME_S)
        )
    return words


def listen(audio_t: np.ndarray, sample_rate: int) -> Speech:
    """Voice-active segments of a channel and the words recognized in them. Each segment is
    recognized with a little audio either side; a word belongs to the segment whose share of
    the timeline (split halfway between neighbouring segments) holds its start, so a word
    near a short gap is counted once."""
    audio = to_16k(audio_t, sample_rate)
    segments = voice_activity(audio)
    words: list[Word] = []
    for i, (start, end) in enumerate(segments):
        lo = (segments[i - 1][1] + start) / 2 if i else -np.inf
        hi = (end + segments[i + 1][0]) / 2 if i + 1 < len(segments) else np.inf
        a = max(0, int((start - ASR_PAD_S) * ASR_RATE))
        b = min(audio.size, int((end + ASR_PAD_S) * ASR_RATE))
        words += [w for w in _recognize(audio[a:b], a / ASR_RATE) if lo <= w.start < hi]
    return Speech(tuple(segments), tuple(words))


def transcribe(audio_t: np.ndarray, sample_rate: int) -> str:
    """The words of a recording as one lowercase string (for word error rates)."""
    return " ".join(w.text for w in listen(audio_t, sample_rate).words)


__all__ = ["ASR_RATE", "Speech", "Word", "listen", "to_16k", "transcribe", "voice_activity"]
