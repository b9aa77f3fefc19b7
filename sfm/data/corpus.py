"""A moshi-finetune speech corpus read record by record, every record checked.

A corpus is a directory with `manifest.jsonl` ({"path", "duration"} per line), or a manifest
file of any name (moshi-finetune's `train.jsonl`), its relative paths read from the
manifest's folder; each 24 kHz WAV sits beside a JSON
{"alignments": [[word, [start_s, end_s], speaker], ...]}. `scan_corpus` runs every check on
every manifest line and returns the good records with the bad ones counted by reason
(`BadRecords`, REASONS); nothing in a corpus raises past it but a missing manifest.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from sfm.data.audio import AudioError, NonFiniteAudioError, PathLike, load_audio
from sfm.errors import SfmError

SAMPLE_RATE = 24000
DURATION_TOLERANCE_S = 0.1  # manifest duration vs. the audio's own length
WORD_SLACK_S = 0.05  # how far a word may end past the last sample
MANIFEST = "manifest.jsonl"  # a corpus folder's manifest

REASONS: dict[str, str] = {
    "bad_manifest_line": "manifest line is not JSON with a 'path' string and 'duration' number",
    "duplicate_path": "the manifest lists this path already (the first one is kept)",
    "missing_audio": "audio file listed in the manifest does not exist",
    "unreadable_audio": "audio is corrupt, empty, or not audio",
    "non_finite_audio": "audio has NaN or Inf samples",
    "truncated_audio": "WAV header declares more data than the file holds",
    "wrong_sample_rate": f"sample rate is not {SAMPLE_RATE} Hz (not resampled silently)",
    "channel_mismatch": "channel count does not match the builder (mono vs stereo)",
    "duration_mismatch": f"manifest duration differs from the audio by > {DURATION_TOLERANCE_S} s",
    "missing_alignments": "alignments JSON beside the audio does not exist",
    "invalid_alignments_json": "alignments file is not valid JSON",
    "bad_alignments_shape": "alignments are not {'alignments': [[word, [start, end], speaker]]}",
    "no_words": "alignments hold no words (empty text)",
    "word_end_before_start": "a word ends before it starts",
    "word_outside_audio": "a word's times fall outside the audio",
    "words_unsorted": "words are not sorted by start time",
    "bad_example": "an in-memory example lacks a field or has a field of the wrong type",
}

log = logging.getLogger(__name__)

Word = tuple[str, float, float, str]  # word, start_s, end_s, speaker


class BadRecord(Exception):
    """A record that is skipped; `reason` is a key of REASONS, `detail` names the file."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{detail}: {REASONS[reason]}")
        self.reason = reason
        self.detail = detail


class CorpusError(SfmError, ValueError):
    """A corpus with no manifest or no usable record at all; the message says why."""


class BadRecords(Counter[str]):
    """Skipped records counted by reason, with the first offending file kept for each reason."""

    def __init__(self, counts: dict[str, int] | None = None) -> None:
        super().__init__(counts or {})
        self.first: dict[str, str] = {}

    def add(self, bad: BadRecord) -> None:
        """Count one skipped record."""
        self[bad.reason] += 1
        self.first.setdefault(bad.reason, bad.detail)
        log.info("skipping %s", bad)

    def __str__(self) -> str:
        if not self:
            return "bad records: none"
        width = max(len(r) for r in self)
        lines = [f"bad records: {self.total()} skipped"]
        for reason, n in sorted(self.items(), key=lambda kv: (-kv[1], kv[0])):
            first = self.first.get(reason, "")
            lines.append(f"  {reason:<{width}} {n:>6}  {REASONS.get(reason, '')}  (e.g. {first})")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Plain dict for writing next to the prepared data."""
        return {"counts": dict(self), "first": self.first}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> BadRecords:
        """Inverse of to_json."""
        out = cls(obj.get("counts", {}))
        out.first.update(obj.get("first", {}))
        return out


@dataclass(frozen=True)
class Record:
    """A manifest entry whose audio and alignments passed every check."""

    key: str  # the manifest's path string: stable, unique, used for the split hash
    path: Path
    num_frames: int
    words: tuple[Word, ...]


# ---------------------------------------------------------------- manifest and audio checks


def corpus_manifest(source: PathLike) -> tuple[Path, Path]:
    """(manifest file, the folder its relative paths start from) of a corpus folder (with
    `manifest.jsonl`) or of a manifest file."""
    src = Path(source)
    if src.is_file() and src.suffix == ".jsonl":
        return src, src.parent
    return src / MANIFEST, src


def manifest_entries(source: PathLike) -> Iterator[tuple[str, float] | BadRecord]:
    """Yield (path, duration) per non-blank manifest line, or BadRecord for a bad line."""
    manifest, _ = corpus_manifest(source)
    if not manifest.is_file():
        raise CorpusError(f"{manifest}: no such manifest")
    with manifest.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield _parse_manifest_line(line, f"{manifest}:{lineno}")


def _parse_manifest_line(line: str, where: str) -> tuple[str, float] | BadRecord:
    """Parse one manifest line into (path, duration)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return BadRecord("bad_manifest_line", where)
    if not isinstance(obj, dict):
        return BadRecord("bad_manifest_line", where)
    path, duration = obj.get("path"), obj.get("duration")
    if not isinstance(path, str) or not path or not _is_number(duration):
        return BadRecord("bad_manifest_line", where)
    return path, float(duration)


def _is_number(x: object) -> bool:
    """True for a finite int/float that is not a bool."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def load_audio_tc(path: Path, channels: int) -> np.ndarray:
    """Load a 24 kHz file of exactly `channels` channels as int16 [T, C]; raises BadRecord."""
    if not path.is_file():
        raise BadRecord("missing_audio", str(path))
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, OSError):
        raise BadRecord("unreadable_audio", str(path)) from None
    if info.samplerate != SAMPLE_RATE:
        raise BadRecord("wrong_sample_rate", f"{path} ({info.samplerate} Hz)")
    if info.channels != channels:
        raise BadRecord("channel_mismatch", f"{path} ({info.channels} channels)")
    try:
        cols = [load_audio(path, SAMPLE_RATE, channel=c) for c in range(channels)]
    except NonFiniteAudioError as e:
        raise BadRecord("non_finite_audio", str(e)) from None
    except AudioError as e:
        reason = "truncated_audio" if "truncated" in str(e) else "unreadable_audio"
        raise BadRecord(reason, str(e)) from None
    audio_tc = np.stack(cols, axis=1)
    if not np.isfinite(audio_tc).all():  # the int16 cast below would hide NaN/Inf as noise
        raise BadRecord("non_finite_audio", f"{path}: audio contains NaN or Inf samples")
    pcm = np.round(audio_tc * 32768.0)
    return np.clip(pcm, -32768, 32767).astype(np.int16)


# ---------------------------------------------------------------- alignment checks


def read_alignments(json_path: Path, duration_s: float) -> tuple[Word, ...]:
    """Read and check the alignments JSON beside a WAV; raises BadRecord."""
    if not json_path.is_file():
        raise BadRecord("missing_alignments", str(json_path))
    try:
        obj = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRecord("invalid_alignments_json", str(json_path)) from None
    rows = obj.get("alignments") if isinstance(obj, dict) else None
    if not isinstance(rows, list):
        raise BadRecord("bad_alignments_shape", str(json_path))
    words = tuple(_parse_word(row, str(json_path)) for row in rows)
    return check_words(words, duration_s, str(json_path))


def _parse_word(row: object, where: str) -> Word:
    """Parse [word, [start, end], speaker] (speaker optional) into a Word."""
    if not isinstance(row, list) or len(row) not in (2, 3):
        raise BadRecord("bad_alignments_shape", where)
    word, times = row[0], row[1]
    speaker = row[2] if len(row) == 3 else ""
    ok_times = isinstance(times, list) and len(times) == 2 and all(map(_is_number, times))
    if not isinstance(word, str) or not isinstance(speaker, str) or not ok_times:
        raise BadRecord("bad_alignments_shape", where)
    return word, float(times[0]), float(times[1]), speaker


def check_words(words: Sequence[Word], duration_s: float, where: str) -> tuple[Word, ...]:
    """Check word times against each other and the audio; raises BadRecord."""
    words = tuple(w for w in words if w[0].strip())
    if not words:
        raise BadRecord("no_words", where)
    for word, start, end, _ in words:
        if end < start:
            raise BadRecord("word_end_before_start", f"{where} ({word!r} {start}-{end})")
        if start < 0 or end > duration_s + WORD_SLACK_S:
            raise BadRecord("word_outside_audio", f"{where} ({word!r} {start}-{end})")
    starts = [w[1] for w in words]
    if any(b < a for a, b in zip(starts, starts[1:])):
        raise BadRecord("words_unsorted", where)
    return words


def check_record(source_dir: Path, entry: tuple[str, float], channels: int) -> Record:
    """Run every check on one manifest entry; raises BadRecord."""
    key, manifest_duration = entry
    path = Path(key) if Path(key).is_absolute() else source_dir / key
    audio = load_audio_tc(path, channels)
    duration = audio.shape[0] / SAMPLE_RATE
    if abs(duration - manifest_duration) > DURATION_TOLERANCE_S:
        detail = f"{path} (manifest {manifest_duration:.3f} s, audio {duration:.3f} s)"
        raise BadRecord("duration_mismatch", detail)
    words = read_alignments(path.with_suffix(".json"), duration)
    return Record(key=key, path=path, num_frames=audio.shape[0], words=words)


def scan_corpus(source_dir: PathLike, channels: int) -> tuple[list[Record], BadRecords]:
    """Check every manifest line: good records in manifest order, plus the bad-record counts."""
    _, root = corpus_manifest(source_dir)
    good, bad, seen = [], BadRecords(), set()
    for entry in manifest_entries(source_dir):
        try:
            if isinstance(entry, BadRecord):
                raise entry
            if entry[0] in seen:
                raise BadRecord("duplicate_path", entry[0])
            seen.add(entry[0])
            good.append(check_record(root, entry, channels))
        except BadRecord as b:
            bad.add(b)
    return good, bad
