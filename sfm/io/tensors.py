"""safetensors files as numpy arrays: the one reader and writer behind every weight format.

Tensors keep their stored dtype (bfloat16 through ml_dtypes, which the `safetensors`
package's numpy loader cannot produce), so a bf16 release converts without a detour through
torch. They are read into memory (copies: a model loaded from a file never aliases it). The
header is checked before any data is read: a missing, truncated, tampered or foreign file
raises one `CheckpointError` naming it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import safetensors

from sfm.errors import SfmError

PathLike = str | os.PathLike[str]
_HEADER_BYTES = 8  # little-endian u64 length of the JSON header
_MAX_HEADER = 100 * 2**20

# safetensors dtype names -> little-endian numpy dtypes.
DTYPES: dict[str, Any] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


class CheckpointError(SfmError, ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model; the message is
    one line naming the file (or run directory) and the reason."""


class InteropError(CheckpointError):
    """A foreign checkpoint (Kyutai's Mimi or Moshi LM, a Llama-style text LM) or its config
    that does not match the expected layout or sfm's config."""


def _unreadable(path: PathLike, why: str = "truncated or corrupt") -> CheckpointError:
    return CheckpointError(f"{os.fspath(path)}: not a readable safetensors file ({why})")


def read_header(path: PathLike) -> tuple[dict[str, Any], dict[str, str], int]:
    """(tensor entries, metadata, offset of the data) of a safetensors file, checked."""
    try:
        with open(path, "rb") as f:
            size_bytes = f.read(_HEADER_BYTES)
            if len(size_bytes) < _HEADER_BYTES:
                raise _unreadable(path)
            size = int.from_bytes(size_bytes, "little")
            if size > _MAX_HEADER:
                raise _unreadable(path)
            raw = f.read(size)
            file_size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise CheckpointError(f"{os.fspath(path)}: no such checkpoint file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{os.fspath(path)}: a directory, not a checkpoint file") from None
    if len(raw) < size:
        raise _unreadable(path)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _unreadable(path) from None
    if not isinstance(header, dict):
        raise _unreadable(path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _unreadable(path, "metadata is not a mapping of strings")
    start = _HEADER_BYTES + size
    for name, entry in header.items():
        _check_entry(path, name, entry, file_size - start)
    return header, metadata, start


def _check_entry(path: PathLike, name: str, entry: Any, data_bytes: int) -> None:
    """Raise CheckpointError unless `entry` describes a tensor lying inside the file."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise _unreadable(path, f"bad header entry for '{name}'") from None
    if not isinstance(dtype, str) or not isinstance(shape, list):
        raise _unreadable(path, f"bad header entry for '{name}'")
    if not all(_is_count(n) for n in (*shape, begin, end)):
        raise _unreadable(path, f"bad header entry for '{name}'")
    if dtype not in DTYPES:
        raise CheckpointError(f"{os.fspath(path)}: tensor '{name}' has unsupported dtype {dtype}")
    want = math.prod(shape) * DTYPES[dtype].itemsize  # Python ints: no overflow
    if not 0 <= begin <= end <= data_bytes or end - begin != want:
        raise _unreadable(path)


def _is_count(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def read_tensors(path: PathLike) -> dict[str, np.ndarray]:
    """Every tensor of the file in its stored dtype (arrays of their own, not views of it)."""
    header, _, start = read_header(path)
    if not header:
        return {}
    data = np.memmap(path, np.uint8, mode="r")
    out = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        chunk = np.array(data[start + begin : start + end])
        out[name] = chunk.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return out


def widen(x: np.ndarray) -> np.ndarray:
    """Floating-point arrays as float32 (bf16 and f16 releases, f64 state dicts); others as is."""
    return x.astype(np.float32) if x.dtype.kind in "fV" and x.dtype != np.float32 else x


def read_metadata(path: PathLike) -> dict[str, str]:
    """The file's string metadata (empty when it has none)."""
    return read_header(path)[1]


def tensor_names(path: PathLike) -> list[str]:
    """The names of the file's tensors, read from its header only."""
    return list(read_header(path)[0])


def write_tensors(
    path: PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Write numpy arrays (any dtype of DTYPES, bfloat16 included) and string metadata."""
    entries = {}
    for name, value in tensors.items():
        arr = np.asarray(value, order="C")  # (ascontiguousarray would make scalars 1-d)
        entries[name] = {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": arr.tobytes()}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    safetensors.serialize_file(entries, str(p), metadata=dict(metadata) if metadata else None)
