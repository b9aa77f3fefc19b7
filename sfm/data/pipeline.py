"""grain pipelines: sharded ArrayRecord sources -> LM streams with delays -> weighted mixture.

Every stage is a deterministic function of (seed, element index), so a batch iterator's
``get_state()`` / ``set_state()`` resumes exactly, with or without worker processes.
Each element is {"tokens": int32 [S, seq_len], "mask": bool [S, seq_len], "source": int32};
batches stack them to [B, S, seq_len] (see sfm.lm.layout for the stream conventions).
Records that cannot be decoded are skipped, logged and counted by BAD_REASONS key
(``bad_record_counts()``; in-process only, see BAD_RECORDS).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import grain
import numpy as np

from sfm.data.config import SOURCES, DataConfig
from sfm.errors import SfmError
from sfm.lm import layout as lay

log = logging.getLogger(__name__)
BAD_REASONS = {
    "bad_npz": "bytes that np.load cannot read",
    "missing_key": "an npz without codes/text (speech) or tokens (text)",
    "bad_shapes": "arrays of the wrong rank, channel count, length or dtype",
    "empty": "no frames or tokens at all",
}
Element = dict[str, np.ndarray]


class DataError(SfmError, ValueError):
    """Data settings that select nothing to read; the message names the keys."""


def host_shard(cfg: DataConfig) -> tuple[int, int]:
    """(shard_index, shard_count): the config's override, else this JAX process."""
    if cfg.shard_index is not None and cfg.shard_count is not None:
        return cfg.shard_index, cfg.shard_count
    import jax

    return jax.process_index(), jax.process_count()


def sharded_records(paths: Sequence[str], shard: tuple[int, int]) -> grain.MapDataset:
    """Raw record bytes of the given shard files, this host's slice (every n-th record)."""
    index, count = shard
    return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(list(paths)))[index::count]


class BadRecordCounter:
    """Thread-safe counts of skipped records by reason, for the current process."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, reason: str) -> int:
        """Count one skipped record; returns the reason's new count."""
        with self._lock:
            self._counts[reason] += 1
            return self._counts[reason]

    def counts(self) -> dict[str, int]:
        """A copy of the counts so far, by reason."""
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        """Forget every count."""
        with self._lock:
            self._counts.clear()


# Records decoded in this process. grain's read-ahead threads decode before elements are
# consumed; with num_workers > 0 decoding (and counting) happens in the worker processes,
# whose counts stay there and only show in their log warnings.
BAD_RECORDS = BadRecordCounter()


def bad_record_counts() -> dict[str, int]:
    """Records skipped by this process so far, by BAD_REASONS key."""
    return BAD_RECORDS.counts()


def _bad(reason: str, err: object) -> None:
    """Count a skipped record; log the 1st, 10th, 100th, ... of each reason."""
    n = BAD_RECORDS.add(reason)
    if str(n).strip("0") == "1":
        log.warning("skipping bad record (%s, %d so far in this process): %s", reason, n, err)


# np.load parses array headers with ast, which CPython 3.11 does not make thread-safe
# ("AST constructor recursion depth mismatch"): grain's read-ahead threads take turns.
_NPZ_LOCK = threading.Lock()


def _load(data: bytes, keys: tuple[str, ...]) -> dict[str, Any] | None:
    """npz bytes -> arrays holding `keys`, or None (counted) for a bad record."""
    try:
        with _NPZ_LOCK:
            record = lay.decode_record(data)
    except Exception as err:  # zip, pickle and format errors alike
        _bad("bad_npz", err)
        return None
    missing = [k for k in keys if k not in record]
    if missing:
        _bad("missing_key", f"no {', '.join(missing)} in record with {sorted(record)}")
        return None
    return record


def decode_av(data: bytes, layout: lay.StreamLayout) -> tuple[np.ndarray, np.ndarray] | None:
    """Record bytes -> undelayed (tokens, mask), or None for a bad record."""
    record = _load(data, ("codes", "text"))
    if record is None:
        return None
    try:
        tokens, mask = lay.to_streams(record, layout)
    except Exception as err:  # pipelines skip bad records rather than stop
        _bad("bad_shapes", err)
        return None
    if tokens.shape[1] == 0:
        _bad("empty", "record has no frames")
        return None
    return tokens, mask


def _text_tokens(data: bytes | np.ndarray) -> np.ndarray | None:
    """A text record's tokens (an array passes through), or None for a bad npz."""
    if isinstance(data, np.ndarray):
        return data
    record = _load(data, ("tokens",))
    return None if record is None else np.asarray(record["tokens"])


def decode_text(data: bytes | np.ndarray, layout: lay.StreamLayout) -> Any:
    """Text record (npz bytes with key "tokens", or a token array) -> (tokens, mask) or None."""
    tokens_t = _text_tokens(data)
    if tokens_t is None:
        return None
    if tokens_t.ndim != 1 or not np.issubdtype(tokens_t.dtype, np.integer):
        _bad("bad_shapes", f"text tokens {tokens_t.dtype} {tokens_t.shape}, want int [T]")
        return None
    if len(tokens_t) == 0:
        _bad("empty", "text record has no tokens")
        return None
    return lay.text_to_streams(tokens_t, layout)


def window(
    item: Any,
    rng: np.random.Generator,
    *,
    layout: lay.StreamLayout,
    seq_len: int,
    source: int,
    delayed: bool,
    p_text: float = 0.0,
    p_from_start: float = 0.0,
) -> Element | None:
    """Optionally interleave, apply delays, then take a seq_len window: from the first
    frame with probability `p_from_start` (a dialogue's opening, the stream's initial
    tokens included), else from anywhere."""
    if item is None:
        return None
    tokens, mask = item
    if p_text > 0.0:
        tokens, mask = lay.interleave(tokens, mask, layout, rng, p_text)
    if delayed:
        tokens, mask = lay.delay_streams(tokens, mask, layout)
    from_start = p_from_start > 0.0 and rng.random() < p_from_start
    start = 0 if from_start else int(rng.integers(0, max(tokens.shape[1] - seq_len, 0) + 1))
    out = lay.crop_or_pad(tokens, mask, seq_len, layout.ignore, start)
    out["source"] = np.int32(source)
    return out


def source_fns(
    cfg: DataConfig, layout: lay.StreamLayout, source: str
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(decode, window) of one source: bytes -> (tokens, mask) | None; (item, rng) -> Element."""
    k = SOURCES.index(source)
    decode = decode_text if source == "text" else decode_av
    fn = partial(
        window,
        layout=layout,
        seq_len=cfg.seq_len,
        source=k,
        delayed=source != "text",
        p_text=cfg.p_text_span if source == "interleaved" else 0.0,
        p_from_start=cfg.p_from_start,
    )
    return partial(decode, layout=layout), fn


def source_dataset(
    cfg: DataConfig,
    layout: lay.StreamLayout,
    source: str,
    records: grain.MapDataset,
    shuffle_seed: int,
) -> grain.MapDataset:
    """One source: per-epoch shuffle, infinite repeat, decode, layout and window."""
    decode, fn = source_fns(cfg, layout, source)
    ds = records.shuffle(seed=shuffle_seed).repeat()
    return ds.map(decode).random_map(fn, seed=cfg.seed * 1009 + SOURCES.index(source))


def mixture(
    cfg: DataConfig,
    layout: lay.StreamLayout,
    text_sequences: Sequence[np.ndarray] | None = None,
) -> grain.MapDataset:
    """Weighted, infinite MapDataset of single elements over the non-empty sources: the
    global stream, the same on every host."""
    parts, weights = [], []
    for k, (source, weight) in enumerate(zip(SOURCES, cfg.weights)):
        records = sharded_records(cfg.paths(source), (0, 1)) if cfg.paths(source) else None
        if source == "text" and text_sequences is not None:
            records = grain.MapDataset.source(list(text_sequences))
        if records is None or weight <= 0 or len(records) == 0:
            continue
        parts.append(source_dataset(cfg, layout, source, records, cfg.seed * 7919 + k))
        weights.append(weight)
    if not parts:
        raise DataError(
            "data: no source has both shard files (data.*_paths) and a positive data.weights entry"
        )
    return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)


class HostRows(grain.MapDataset):
    """This host's rows of every global batch: element j is global element
    (j // b) * batch + index * b + j % b, with b = batch / count rows per host.

    Every host reads only the records of its own rows, and any number of hosts together
    produce the same global batches as one host: a run's data does not depend on its
    process count."""

    def __init__(self, parent: grain.MapDataset, batch: int, shard: tuple[int, int]) -> None:
        super().__init__(parent)
        self.batch, (self.index, self.count) = batch, shard
        if batch % self.count:
            raise DataError(f"data.batch_size: {batch} is not divisible by {self.count} hosts")
        self.rows = batch // self.count

    def __len__(self) -> int:
        return len(self._parent) // self.count

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        row, step = index % self.rows, index // self.rows
        return self._parent[step * self.batch + self.index * self.rows + row]


def _ensure_absl_flags() -> None:
    """grain worker processes read absl flags; mark them parsed when nobody did."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_dataset(
    cfg: DataConfig,
    layout: lay.StreamLayout,
    text_sequences: Sequence[np.ndarray] | None = None,
) -> grain.IterDataset:
    """This host's rows of each global batch of `cfg.batch_size`, records in `layout`, as an
    IterDataset of {"tokens" [b,S,T], "mask" [b,S,T], "source" [b]}, b = batch_size / hosts."""
    rows = HostRows(mixture(cfg, layout, text_sequences), cfg.batch_size, host_shard(cfg))
    ds = rows.to_iter_dataset().batch(rows.rows, drop_remainder=True)
    if cfg.num_workers > 0:
        _ensure_absl_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return ds
