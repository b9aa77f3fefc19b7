"""LibriSpeech through tfds, converted to the speech example layout of `sfm.data.tfds_speech`.

For users with internet access. Preparing the tfds `librispeech` builder downloads ~60 GB
(all splits are prepared together) and its generator needs TensorFlow for file globbing
(`pip install tensorflow`); reading the prepared ArrayRecord data afterwards does not:

    from sfm.data.librispeech import load_librispeech
    for ex in load_librispeech("dev_clean", data_dir="~/tensorflow_datasets"):
        ex["audio"]  # int16 [T, 1] at 24 kHz

Each example becomes a mono utterance as `SpeechUtterances` stores it: 16 kHz speech is
resampled to 24 kHz; the transcript's words carry NaN start/end times unless forced
alignments are given ({utterance id: [(word, start_s, end_s), ...]}). Bad examples (empty or
non-finite audio, empty text, bad alignments) are skipped and counted in a `BadRecords`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from sfm.data.audio import resample
from sfm.data.corpus import SAMPLE_RATE, BadRecord, BadRecords, check_words
from sfm.data.tfds_speech import to_example

LIBRISPEECH_RATE = 16000
SPLITS = (
    "train_clean100",
    "train_clean360",
    "train_other500",
    "dev_clean",
    "dev_other",
    "test_clean",
    "test_other",
)

Alignments = Mapping[str, Sequence[tuple[str, float, float]]]


def _text(value: Any) -> str:
    """Decode a tfds Text value (bytes from a data source, str from a generator)."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _speech_24k(speech: Any, where: str) -> np.ndarray:
    """16 kHz integer PCM [T] (or [T, 1]) to int16 [T, 1] at 24 kHz; raises BadRecord."""
    pcm = np.asarray(speech).reshape(-1)
    if pcm.size == 0:
        raise BadRecord("unreadable_audio", f"{where} (empty audio)")
    wav = pcm.astype(np.float32)
    if np.issubdtype(pcm.dtype, np.integer):
        wav /= 32768.0
    if not np.isfinite(wav).all():
        raise BadRecord("non_finite_audio", f"{where} (NaN or Inf samples)")
    out = np.round(resample(wav, LIBRISPEECH_RATE, SAMPLE_RATE) * 32768.0)
    return np.clip(out, -32768, 32767).astype(np.int16)[:, None]


def _words(
    text: str,
    speaker: str,
    timed: Sequence[tuple[str, float, float]] | None,
    duration_s: float,
    where: str,
) -> tuple[tuple[str, float, float, str], ...]:
    """Transcript words with NaN times, or the given alignments checked against the audio."""
    if timed is None:
        words = tuple((w, math.nan, math.nan, speaker) for w in text.split())
        if not words:
            raise BadRecord("no_words", where)
        return words
    try:
        words = tuple((str(w), float(s), float(e), speaker) for w, s, e in timed)
    except (TypeError, ValueError):
        raise BadRecord("bad_alignments_shape", where) from None
    return check_words(words, duration_s, where)


def librispeech_example(
    example: Mapping[str, Any], timed: Sequence[tuple[str, float, float]] | None = None
) -> dict[str, Any]:
    """Convert one LibriSpeech example ({speech, text, speaker_id, id}); raises BadRecord."""
    key = _text(example["id"])
    audio = _speech_24k(example["speech"], key)
    speaker = f"librispeech_{int(example['speaker_id'])}"
    words = _words(_text(example["text"]), speaker, timed, audio.shape[0] / SAMPLE_RATE, key)
    return to_example(key, words, audio)


def convert_librispeech(
    examples: Iterable[Mapping[str, Any]],
    alignments: Alignments | None = None,
    bad: BadRecords | None = None,
) -> Iterator[dict[str, Any]]:
    """Convert LibriSpeech-shaped examples lazily, skipping and counting bad ones in `bad`."""
    bad = BadRecords() if bad is None else bad
    for example in examples:
        try:
            key = _text(example["id"])
            timed = None if alignments is None else alignments.get(key)
            if alignments is not None and timed is None:
                raise BadRecord("missing_alignments", key)
            yield librispeech_example(example, timed)
        except BadRecord as b:
            bad.add(b)
        except (KeyError, TypeError, ValueError):
            bad.add(BadRecord("bad_example", f"example {str(example)[:80]}"))


def load_librispeech(
    split: str = "dev_clean",
    data_dir: str | None = None,
    alignments: Alignments | None = None,
    bad: BadRecords | None = None,
) -> Iterator[dict[str, Any]]:
    """Download and prepare LibriSpeech with tfds (needs internet), then convert `split`."""
    import tensorflow_datasets as tfds

    if split not in SPLITS:
        raise ValueError(f"unknown LibriSpeech split {split!r}; one of {', '.join(SPLITS)}")
    builder = tfds.builder("librispeech", data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return convert_librispeech(builder.as_data_source(split), alignments, bad)
