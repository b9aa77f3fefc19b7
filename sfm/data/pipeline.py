"""grain pipelines: sharded ArrayRecord sources -> LM streams with delays -> weighted mixture.

Every stage is a deterministic function of (seed, element index), so a batch iterator's
``get_state()`` / ``set_state()`` resumes exactly, with or without worker processes.
Each element is {"tokens": int32 [S, seq_len], "mask": bool [S, seq_len], "source": int32};
batches stack them to [B, S, seq_len] (see sfm.data.layout for the stream conventions).
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grain
import numpy as np

from sfm.data import layout as lay

log = logging.getLogger(__name__)
SOURCES = ("text", "speech", "interleaved", "duplex")
Element = dict[str, np.ndarray]


@dataclass(frozen=True)
class DataConfig:
    """Shard globs and weight per source, window, batch, seed, layout and host sharding."""

    text_paths: tuple[str, ...] = ()
    speech_paths: tuple[str, ...] = ()
    interleaved_paths: tuple[str, ...] = ()
    duplex_paths: tuple[str, ...] = ()
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    seq_len: int = 250
    batch_size: int = 8
    seed: int = 0
    n_q: int = 8
    delays: tuple[int, ...] = field(default_factory=lambda: lay.moshi_delays(8))
    p_text_span: float = 0.5
    shard_index: int | None = None
    shard_count: int | None = None
    num_workers: int = 0

    def layout(self) -> lay.StreamLayout:
        """The stream layout these settings describe."""
        return lay.StreamLayout(n_q=self.n_q, delays=self.delays)

    def paths(self, source: str) -> tuple[str, ...]:
        """Shard files of one source, globs expanded, sorted."""
        globs = getattr(self, f"{source}_paths")
        return tuple(sorted({p for g in globs for p in glob.glob(g)}))


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


def _bad(what: str, err: Exception) -> None:
    """Log a skipped record."""
    log.warning("skipping bad %s record: %s", what, err)


def decode_av(data: bytes, layout: lay.StreamLayout) -> tuple[np.ndarray, np.ndarray] | None:
    """Record bytes -> undelayed (tokens, mask), or None for a bad record."""
    try:
        return lay.to_streams(lay.decode_record(data), layout)
    except Exception as err:  # pipelines skip bad records rather than stop
        _bad("audio", err)
        return None


def decode_text(data: bytes | np.ndarray, layout: lay.StreamLayout) -> Any:
    """Text record (npz bytes with key "tokens", or a token array) -> (tokens, mask) or None."""
    try:
        tokens_t = data if isinstance(data, np.ndarray) else lay.decode_record(data)["tokens"]
        return lay.text_to_streams(np.asarray(tokens_t).reshape(-1), layout)
    except Exception as err:
        _bad("text", err)
        return None


def window(
    item: Any,
    rng: np.random.Generator,
    *,
    layout: lay.StreamLayout,
    seq_len: int,
    source: int,
    delayed: bool,
    p_text: float = 0.0,
) -> Element | None:
    """Optionally interleave, apply delays, then take a random seq_len window."""
    if item is None:
        return None
    tokens, mask = item
    if p_text > 0.0:
        tokens, mask = lay.interleave(tokens, mask, layout, rng, p_text)
    if delayed:
        tokens, mask = lay.delay_streams(tokens, mask, layout)
    start = int(rng.integers(0, max(tokens.shape[1] - seq_len, 0) + 1))
    out = lay.crop_or_pad(tokens, mask, seq_len, layout.ignore, start)
    out["source"] = np.int32(source)
    return out


def source_dataset(
    cfg: DataConfig, source: str, records: grain.MapDataset, shuffle_seed: int
) -> grain.MapDataset:
    """One source: per-epoch shuffle, infinite repeat, decode, layout and window."""
    layout, k = cfg.layout(), SOURCES.index(source)
    decode = decode_text if source == "text" else decode_av
    fn = partial(
        window,
        layout=layout,
        seq_len=cfg.seq_len,
        source=k,
        delayed=source != "text",
        p_text=cfg.p_text_span if source == "interleaved" else 0.0,
    )
    ds = records.shuffle(seed=shuffle_seed).repeat()
    return ds.map(partial(decode, layout=layout)).random_map(fn, seed=cfg.seed * 1009 + k)


def mixture(
    cfg: DataConfig, text_sequences: Sequence[np.ndarray] | None = None
) -> grain.MapDataset:
    """Weighted, infinite MapDataset of single elements over the non-empty sources."""
    shard = host_shard(cfg)
    parts, weights = [], []
    for k, (source, weight) in enumerate(zip(SOURCES, cfg.weights)):
        records = sharded_records(cfg.paths(source), shard) if cfg.paths(source) else None
        if source == "text" and text_sequences is not None:
            records = grain.MapDataset.source(list(text_sequences))[shard[0] :: shard[1]]
        if records is None or weight <= 0 or len(records) == 0:
            continue
        parts.append(source_dataset(cfg, source, records, cfg.seed * 7919 + k))
        weights.append(weight)
    if not parts:
        raise ValueError("DataConfig: no source has both shards and a positive weight")
    return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)


def _ensure_absl_flags() -> None:
    """grain worker processes read absl flags; mark them parsed when nobody did."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_dataset(
    cfg: DataConfig, text_sequences: Sequence[np.ndarray] | None = None
) -> grain.IterDataset:
    """Batched per-host IterDataset of {"tokens" [B,S,T], "mask" [B,S,T], "source" [B]}."""
    ds = mixture(cfg, text_sequences).to_iter_dataset()
    ds = ds.batch(cfg.batch_size, drop_remainder=True)
    if cfg.num_workers > 0:
        _ensure_absl_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return ds
