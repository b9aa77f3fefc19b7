"""Read and write audio files as mono float32 at a target sample rate, with one-line errors."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from sfm.errors import SfmError

# WAV writers that stream to a pipe leave these placeholders in place of the data size.
_UNKNOWN_WAV_SIZES = (0, 0xFFFFFFFF, 0x7FFFF000)

PathLike = str | os.PathLike[str]


class AudioError(SfmError, ValueError):
    """A user-facing problem with an audio file; the message is one line: '<path>: <reason>'."""


class NonFiniteAudioError(AudioError):
    """The file decodes, but some samples are NaN or Inf (float WAVs can hold them)."""


def _fail(path: PathLike, reason: str, cls: type[AudioError] = AudioError) -> AudioError:
    """Build the one-line error for `path`."""
    return cls(f"{os.fspath(path)}: {reason}")


def _wav_data_chunk(path: Path) -> tuple[int, int] | None:
    """Return (data offset, declared data bytes) of a RIFF/WAVE file, or None if not one."""
    with path.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"data":
                return f.tell(), size
            f.seek(size + (size & 1), os.SEEK_CUR)


def _check_not_truncated(path: Path, file_format: str) -> None:
    """Raise if a WAV header declares more sample data than the file holds.

    libsndfile silently shortens such files, so a cut-off download would otherwise pass.
    """
    if file_format not in ("WAV", "WAVEX"):
        return
    chunk = _wav_data_chunk(path)
    if chunk is None:
        return
    offset, declared = chunk
    if declared in _UNKNOWN_WAV_SIZES:
        return
    present = path.stat().st_size - offset
    if present < declared:
        raise _fail(
            path, f"truncated WAV file (header declares {declared} data bytes, {present} present)"
        )


def _read(path: Path) -> tuple[np.ndarray, int]:
    """Read all frames as float32 [T, C] plus the file's sample rate."""
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "is a directory, not an audio file")
    try:
        info = sf.info(str(path))
        _check_not_truncated(path, info.format)
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except sf.SoundFileError as e:
        reason = str(e).split(":", 1)[-1].strip().rstrip(".") or "unreadable"
        raise _fail(path, f"not a readable audio file ({reason})") from None
    return data, int(rate)


def _pick_channel(path: Path, data_tc: np.ndarray, channel: int | None) -> np.ndarray:
    """Average all channels to mono, or take `channel` alone."""
    n_channels = data_tc.shape[1]
    if channel is None:
        return data_tc.mean(axis=1, dtype=np.float32)
    if not 0 <= channel < n_channels:
        raise _fail(
            path,
            f"channel {channel} out of range: the file has {n_channels} "
            f"channel{'s' if n_channels != 1 else ''}",
        )
    return np.ascontiguousarray(data_tc[:, channel])


def resample(wav: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample a 1-D signal by the rational factor to_rate/from_rate (polyphase filter)."""
    if from_rate == to_rate:
        return wav.astype(np.float32, copy=False)
    g = math.gcd(from_rate, to_rate)
    out = resample_poly(wav, to_rate // g, from_rate // g)
    return out.astype(np.float32)


def load_audio(path: PathLike, sample_rate: int = 24000, channel: int | None = None) -> np.ndarray:
    """Load an audio file as mono float32 [T] at `sample_rate`; bad input raises AudioError."""
    p = Path(path)
    data_tc, rate = _read(p)
    if data_tc.shape[0] == 0:
        raise _fail(path, "empty audio (0 samples)")
    if not np.isfinite(data_tc).all():
        raise _fail(path, "audio contains NaN or Inf samples", NonFiniteAudioError)
    wav = _pick_channel(p, data_tc, channel)
    return resample(wav, rate, sample_rate)


def save_audio(path: PathLike, wav: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Write mono [T] or [T, C] audio as WAV; PCM output is clipped to [-1, 1]."""
    p = Path(path)
    data = np.asarray(wav, dtype=np.float32)
    if subtype.startswith("PCM"):
        data = np.clip(data, -1.0, 1.0)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(p), data, sample_rate, subtype=subtype, format="WAV")
    except (OSError, sf.SoundFileError) as e:
        raise _fail(path, f"cannot write audio ({e})") from None
