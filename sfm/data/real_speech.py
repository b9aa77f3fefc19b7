"""A small evaluation set of real recorded speech from Debian packages (never for training).

Sources (installed by launch/setup.sh): alsa-utils' spoken channel names, ktuberling-data's
English word recordings (the file name is the word) and codec2-examples' speech samples
(radio and studio recordings, no transcripts). Everything is resampled to 24 kHz mono and
written in the moshi-finetune manifest layout, with the source and transcript (if known).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from sfm.data.audio import load_audio, resample, save_audio
from sfm.errors import SfmError

SAMPLE_RATE = 24000
ALSA_DIR = Path("/usr/share/sounds/alsa")
KTUBERLING_DIR = Path("/usr/share/ktuberling/sounds/en")
CODEC2_DIR = Path("/usr/share/codec2/raw")
# codec2-examples' raw files that hold speech (8 kHz, 16-bit little-endian, mono).
CODEC2_SPEECH = (
    "hts1a", "hts2a", "big_dog", "kristoff", "forig", "morig", "mmt1",
    "cq_ref", "ve9qrp_10s", "vk5qi", "g3plx",
)  # fmt: skip
PACKAGES = {"alsa": "alsa-utils", "ktuberling": "ktuberling-data", "codec2": "codec2-examples"}


class EvalSetError(SfmError, ValueError):
    """The Debian packages holding the recordings are missing; the message names them."""


@dataclass(frozen=True)
class Recording:
    """One recording: where it came from, its audio at 24 kHz and its transcript if known."""

    source: str
    name: str
    audio: np.ndarray
    text: str | None


def _alsa() -> list[Recording]:
    """Spoken speaker-position names ("Front Center"); Noise.wav is not speech."""
    files = sorted(p for p in ALSA_DIR.glob("*.wav") if p.stem != "Noise")
    return [
        Recording("alsa", p.stem, load_audio(p), p.stem.replace("_", " ").lower()) for p in files
    ]


def _ktuberling() -> list[Recording]:
    """Single English words; `egypt_camel.ogg` says "camel"."""
    files = sorted(KTUBERLING_DIR.glob("*.ogg"))
    return [Recording("ktuberling", p.stem, load_audio(p), p.stem.split("_")[-1]) for p in files]


def _codec2() -> list[Recording]:
    """Raw 8 kHz speech samples and the 16 kHz reference clip."""
    out = []
    for name in CODEC2_SPEECH:
        raw = np.fromfile(CODEC2_DIR / f"{name}.raw", dtype="<i2").astype(np.float32) / 32768.0
        out.append(Recording("codec2", name, resample(raw, 8000, SAMPLE_RATE), None))
    clip = CODEC2_DIR / "speech_orig_16k.wav"
    out.append(Recording("codec2", clip.stem, load_audio(clip), None))
    return out


def _check_installed() -> None:
    """One clear error naming the missing Debian packages."""
    present = {"alsa": ALSA_DIR, "ktuberling": KTUBERLING_DIR, "codec2": CODEC2_DIR}
    missing = [PACKAGES[k] for k, d in present.items() if not d.is_dir()]
    if missing:
        raise EvalSetError(
            f"missing Debian packages {', '.join(missing)}: run `bash launch/setup.sh`"
        )


def recordings() -> list[Recording]:
    """Every recording of the evaluation set, in a stable order."""
    _check_installed()
    return [*_alsa(), *_ktuberling(), *_codec2()]


@dataclass(frozen=True)
class EvalSetSummary:
    """Counts per source and total duration."""

    out_dir: Path
    per_source: dict[str, int]
    seconds: float

    def line(self) -> str:
        """A one-line report."""
        parts = ", ".join(f"{k} {v}" for k, v in self.per_source.items())
        n = sum(self.per_source.values())
        return f"{self.out_dir}: {n} recordings ({parts}), {self.seconds / 60:.1f} min"


def build_eval_set(out_dir: str | PathLike[str]) -> EvalSetSummary:
    """Write wav/<source>_<name>.wav and manifest.jsonl (path, duration, source, text)."""
    out = Path(out_dir)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    total = 0.0
    with (out / "manifest.jsonl").open("w") as manifest:
        for rec in recordings():
            rel = f"wav/{rec.source}_{rec.name}.wav"
            save_audio(out / rel, rec.audio, SAMPLE_RATE)
            duration = len(rec.audio) / SAMPLE_RATE
            row = {
                "path": rel,
                "duration": round(duration, 4),
                "source": rec.source,
                "text": rec.text,
            }
            manifest.write(json.dumps(row) + "\n")
            counts[rec.source] = counts.get(rec.source, 0) + 1
            total += duration
    return EvalSetSummary(out, counts, total)
