"""Plain text (one document or sentence per line) -> ArrayRecord shards of text tokens.

Lines are SentencePiece-encoded (blank lines are counted and skipped), packed whole into
sequences of at most `seq_tokens` (a longer line is cut) and written as
`text-<i>-of-<n>.array_record` shards of `np.savez` records holding `tokens` int32 [T]. As
with sfm.data.tokenize, hosts take every process_count-th shard and a rerun writes only the
shards that are missing.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import sentencepiece as spm

from sfm.data.audio import PathLike
from sfm.data.config import DataConfig
from sfm.data.tokenize import TokenizeError, shard_name, write_shard
from sfm.data.tokenizer import load_tokenizer
from sfm.lm.layout import TEXT_EPAD, TEXT_PAD, decode_record, encode_record

TEXT_SPLIT = "text"
TEXT_SEQ_TOKENS = DataConfig.seq_len  # the default window covers one sequence
ENCODE_BATCH = 4096  # lines per SentencePiece call


@dataclass
class TextSummary:
    """What one text tokenization run did; `sequences` counts every host's."""

    out_dir: Path
    lines: int = 0
    empty_lines: int = 0
    tokens: int = 0
    sequences: int = 0
    shards_written: int = 0
    shards_done_before: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        """One-line report for the command line."""
        return (
            f"{self.out_dir}: {self.lines} lines ({self.empty_lines} empty, skipped), "
            f"{self.tokens} tokens in {self.sequences} sequences; shards written "
            f"{self.shards_written}, already complete {self.shards_done_before}; "
            f"{self.seconds:.1f} s"
        )


def text_record_bytes(tokens_t: np.ndarray) -> bytes:
    """One text-only sequence in the record layout: key `tokens`, int32 [T]."""
    return encode_record({"tokens": np.asarray(tokens_t, np.int32)})


def read_text_record(data: bytes) -> np.ndarray:
    """Inverse of text_record_bytes: the tokens int32 [T]."""
    return decode_record(data)["tokens"]


def _text_lines(text: PathLike | Iterable[str]) -> Iterator[str]:
    """Lines of a UTF-8 file (a str is a path), or the given lines."""
    if not isinstance(text, str | os.PathLike):
        yield from text
        return
    with open(text, encoding="utf-8") as f:
        try:
            yield from f
        except UnicodeDecodeError as e:
            raise TokenizeError(f"{text}: not UTF-8 text (bad byte at offset {e.start})") from None


def _name(text: PathLike | Iterable[str]) -> str:
    """The text file's name for messages, or "text" for lines given directly."""
    return str(text) if isinstance(text, str | os.PathLike) else "text"


def _batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of up to `size` lines."""
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_lines(
    sp: spm.SentencePieceProcessor, lines: Iterable[str], summary: TextSummary
) -> Iterator[list[int]]:
    """Token ids of each line with text; blank lines (or lines without a token) are counted."""
    for batch in _batches(lines, ENCODE_BATCH):
        for ids in sp.encode([" ".join(line.split()) for line in batch]):
            kept = [i for i in ids if i not in (TEXT_EPAD, TEXT_PAD)]
            summary.lines += 1
            summary.empty_lines += not kept
            summary.tokens += len(kept)
            if kept:
                yield kept


def pack_lines(token_lines: Iterable[list[int]], seq_tokens: int) -> Iterator[np.ndarray]:
    """Whole lines packed into int32 sequences of at most seq_tokens; longer lines are cut."""
    current: list[int] = []
    for ids in token_lines:
        if current and len(current) + len(ids) > seq_tokens:
            yield np.asarray(current, np.int32)
            current = []
        current.extend(ids)
        while len(current) >= seq_tokens:
            yield np.asarray(current[:seq_tokens], np.int32)
            current = current[seq_tokens:]
    if current:
        yield np.asarray(current, np.int32)


def _write_text_shards(
    sequences: Sequence[np.ndarray], per_shard: int, summary: TextSummary
) -> None:
    """Write this host's missing shards of the packed sequences."""
    count = max(1, math.ceil(len(sequences) / per_shard))
    for index in range(jax.process_index(), count, jax.process_count()):
        path = summary.out_dir / shard_name(TEXT_SPLIT, index, count)
        if path.is_file():
            summary.shards_done_before += 1
            continue
        chunk = sequences[index * per_shard : (index + 1) * per_shard]
        write_shard(path, [text_record_bytes(seq) for seq in chunk])
        summary.shards_written += 1


def tokenize_text(
    text_path_or_lines: PathLike | Iterable[str],
    out_dir: PathLike,
    tokenizer_path: PathLike,
    seq_tokens: int = TEXT_SEQ_TOKENS,
    records_per_shard: int = 1024,
) -> TextSummary:
    """SentencePiece-encode text (one document per line) into `text-*.array_record` shards."""
    t0, summary = time.perf_counter(), TextSummary(Path(out_dir))
    if seq_tokens < 1 or records_per_shard < 1:
        sizes = f"{seq_tokens}, {records_per_shard}"
        raise TokenizeError(f"seq_tokens and records_per_shard must be >= 1, got {sizes}")
    sp = load_tokenizer(tokenizer_path)
    lines = _text_lines(text_path_or_lines)
    # All sequences are held in memory: every shard's boundaries depend on their count.
    sequences = list(pack_lines(encode_lines(sp, lines, summary), seq_tokens))
    if not sequences:
        raise TokenizeError(f"{_name(text_path_or_lines)}: no text to tokenize")
    summary.sequences = len(sequences)
    summary.out_dir.mkdir(parents=True, exist_ok=True)
    _write_text_shards(sequences, records_per_shard, summary)
    summary.seconds = time.perf_counter() - t0
    return summary
