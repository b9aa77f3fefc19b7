"""The codec over whole files: chunked streaming encode/decode and `.npz` code files.

Long audio goes through `StreamingCodec` in fixed chunks of CHUNK_FRAMES frames, so one
compiled step serves any length: the last chunk is zero-padded and the output trimmed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sfm.codec.config import CodecConfig
from sfm.codec.model import Mimi
from sfm.codec.streaming import StreamingCodec
from sfm.errors import SfmError

CHUNK_FRAMES = 25  # 2 s at Mimi's 12.5 Hz
PROGRESS_MIN_SECONDS = 10.0
PathLike = str | os.PathLike[str]


class CodesError(SfmError, ValueError):
    """A user-facing problem with a code file; the message is one line naming the file."""


def bitrate_kbps(cfg: CodecConfig) -> float:
    """Bits per second of `cfg.n_q` codebooks of `bins` entries at the frame rate, in kbps."""
    return cfg.n_q * math.log2(cfg.quantizer.bins) * cfg.frame_rate / 1000.0


def _progress(total: int, seconds: float, desc: str) -> tqdm:
    """A progress bar over chunks, shown only on a terminal and for audio of 10 s or more."""
    quiet = not sys.stderr.isatty() or seconds < PROGRESS_MIN_SECONDS
    return tqdm(total=total, desc=desc, unit="chunk", disable=quiet, leave=False)


def _chunks(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Split the last axis into chunks of exactly `size`, zero-padding the final one."""
    n_chunks = max(1, math.ceil(x.shape[-1] / size))
    pad = n_chunks * size - x.shape[-1]
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    for i in range(n_chunks):
        yield padded[..., i * size : (i + 1) * size]


def _run_chunks(
    x: np.ndarray, size: int, step: Callable[[np.ndarray], np.ndarray], seconds: float, desc: str
) -> np.ndarray:
    """Apply a streaming `step` to each chunk of `x` in order and join the outputs in time."""
    outs = []
    total = max(1, math.ceil(x.shape[-1] / size))
    with _progress(total, seconds, desc) as bar:
        for chunk in _chunks(x, size):
            outs.append(np.asarray(step(chunk)))
            bar.update(1)
    return np.concatenate(outs, axis=-1)


def encode_wav(codec: StreamingCodec, wav_t: np.ndarray) -> np.ndarray:
    """Mono audio [T] at the codec's sample rate -> codes [n_q, ceil(T / frame_size)] int32."""
    cfg = codec.cfg
    codec.reset()
    seconds = wav_t.shape[0] / cfg.sample_rate
    codes_bkt = _run_chunks(
        wav_t[None].astype(np.float32),
        CHUNK_FRAMES * cfg.frame_size,
        codec.encode_chunk,
        seconds,
        "encode",
    )
    n_frames = math.ceil(wav_t.shape[0] / cfg.frame_size)
    return codes_bkt[0, :, :n_frames].astype(np.int32)


def decode_codes(
    codec: StreamingCodec, codes_kt: np.ndarray, n_samples: int | None = None
) -> np.ndarray:
    """Codes [n_q, frames] -> mono audio [n_samples or frames * frame_size] float32."""
    cfg = codec.cfg
    codec.reset()
    seconds = codes_kt.shape[1] / cfg.frame_rate
    wav_bt = _run_chunks(
        codes_kt[None].astype(np.int32), CHUNK_FRAMES, codec.decode_chunk, seconds, "decode"
    )
    full = codes_kt.shape[1] * cfg.frame_size
    return wav_bt[0, : full if n_samples is None else min(n_samples, full)].astype(np.float32)


def streaming_codec(model: Mimi) -> StreamingCodec:
    """A batch-1 streaming wrapper around `model` for file-sized work."""
    return StreamingCodec(model, 1)


def save_codes(path: PathLike, codes_kt: np.ndarray, cfg: CodecConfig, n_samples: int) -> None:
    """Write codes [n_q, frames] (int16 when the codebook fits) and their timing to `.npz`."""
    dtype = np.int16 if cfg.quantizer.bins <= np.iinfo(np.int16).max + 1 else np.int32
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("wb") as f:
        np.savez(
            f,
            codes=codes_kt.astype(dtype),
            sample_rate=np.int32(cfg.sample_rate),
            frame_rate=np.float64(cfg.frame_rate),
            n_samples=np.int64(n_samples),
        )


@dataclasses.dataclass(frozen=True)
class CodeFile:
    """The content of a code file: codes [n_q, frames] int32 and the original length."""

    codes_kt: np.ndarray
    n_samples: int | None


def _read_npz(path: PathLike) -> dict[str, np.ndarray]:
    """Every array of an `.npz` file; missing files raise FileNotFoundError, others CodesError."""
    if not Path(path).exists():
        raise FileNotFoundError(2, "no such file", os.fspath(path))
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise CodesError(f"{os.fspath(path)}: not a readable .npz code file") from None


def _check_codes(name: str, codes: np.ndarray, cfg: CodecConfig) -> None:
    """Raise CodesError unless `codes` is an integer [cfg.n_q, frames>0] array within bins."""
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise CodesError(
            f"{name}: 'codes' must be an integer array [n_q, frames], "
            f"got {codes.dtype} {list(codes.shape)}"
        )
    if codes.shape[0] != cfg.n_q:
        raise CodesError(
            f"{name}: codes have {codes.shape[0]} codebooks but the config "
            f"uses n_q={cfg.n_q} (pass codec.n_q={codes.shape[0]}?)"
        )
    if codes.shape[1] == 0:
        raise CodesError(f"{name}: codes hold no frames")
    bins = cfg.quantizer.bins
    if codes.min() < 0 or codes.max() >= bins:
        raise CodesError(
            f"{name}: codes out of range [0, {bins}): found values from "
            f"{int(codes.min())} to {int(codes.max())}"
        )


def load_codes(path: PathLike, cfg: CodecConfig) -> CodeFile:
    """Read and validate a code file written by `save_codes` against `cfg`."""
    name = os.fspath(path)
    arrays = _read_npz(path)
    if "codes" not in arrays:
        raise CodesError(f"{name}: no 'codes' array (found: {', '.join(arrays) or 'nothing'})")
    _check_codes(name, arrays["codes"], cfg)
    if "sample_rate" in arrays and int(arrays["sample_rate"]) != cfg.sample_rate:
        raise CodesError(
            f"{name}: codes are for {int(arrays['sample_rate'])} Hz but the "
            f"config's codec runs at {cfg.sample_rate} Hz"
        )
    n_samples = int(arrays["n_samples"]) if "n_samples" in arrays else None
    return CodeFile(arrays["codes"].astype(np.int32), n_samples)


def warm_up(codec: StreamingCodec) -> None:
    """Compile the chunk encode and decode steps so that later timings exclude compilation."""
    cfg = codec.cfg
    codes_kt = encode_wav(codec, np.zeros(CHUNK_FRAMES * cfg.frame_size, np.float32))
    decode_codes(codec, codes_kt)
