"""Typed configuration of the LM's input pipeline: sources, window, global batch, sharding."""

from __future__ import annotations

import glob
from dataclasses import dataclass

SOURCES = ("text", "speech", "interleaved", "duplex")


@dataclass(frozen=True)
class DataConfig:
    """Shard globs and weight per source, window, global batch, seed, host sharding.

    `batch_size` is the global batch: every host reads `batch_size / hosts` rows of it, and
    compile, training and throughput figures all count it the same way. The stream layout
    (codebooks, delays) is the LM's (`LMConfig.layout`), not a data setting.
    `p_from_start`: the share of windows (of every source) that open at their record's
    first frame, so that a model sees how a recording begins, as it does at inference from
    an empty context (a dialogue: the user speaks first)."""

    text_paths: tuple[str, ...] = ()
    speech_paths: tuple[str, ...] = ()
    interleaved_paths: tuple[str, ...] = ()
    duplex_paths: tuple[str, ...] = ()
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    seq_len: int = 250
    batch_size: int = 8
    seed: int = 0
    p_text_span: float = 0.5
    p_from_start: float = 0.0
    shard_index: int | None = None
    shard_count: int | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}: must be >= 1, got {getattr(self, name)}")
        if min(self.weights) < 0:
            raise ValueError(f"data.weights: must be >= 0, got {list(self.weights)}")
        for name in ("p_text_span", "p_from_start"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.{name}: must lie in [0, 1], got {getattr(self, name)}")

    def paths(self, source: str) -> tuple[str, ...]:
        """Shard files of one source, globs expanded, sorted."""
        globs = getattr(self, f"{source}_paths")
        return tuple(sorted({p for g in globs for p in glob.glob(g)}))
