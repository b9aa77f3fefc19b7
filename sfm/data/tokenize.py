"""Prepared speech -> ArrayRecord shards of codec codes and word-aligned text streams.

Every example of every split is encoded by the codec (each channel separately) and given one
text stream per channel: the assistant's words (SPEAKER_MAIN) on channel 0, the user's
(SPEAKER_USER) on channel 1; a mono example puts all its words on channel 0. Each record is
`np.savez` bytes:

    codes       int16 [C, K, T]   T = ceil(samples / frame_size)
    text        int32 [C, T]      see sfm.data.text_stream
    frame_rate  float             codec frames per second
    path        str               the example's manifest path

Shards are `<split>-<i:05d>-of-<n:05d>.array_record`. Hosts take every process_count-th
shard; within a host each codec batch is sharded over the local devices. A shard is written
under a temporary name and renamed when complete, so a rerun skips the shards already there.

Records are skipped at two stages: `prepare` (sfm.data.tfds_speech) counts the corpus's bad
records by reason in `bad_records.json` beside the prepared data; this stage skips examples
it cannot encode (SKIP_REASONS) and appends one JSON line per skipped example to
`bad_records.jsonl` in the output directory. The summary line reports both stages.
Plain text gets its shards from sfm.data.tokenize_text.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sfm.codec.model import Mimi
from sfm.data.audio import PathLike
from sfm.data.corpus import BadRecords, corpus_manifest, manifest_entries
from sfm.data.text_stream import TimedWord, place_words
from sfm.data.tfds_speech import BAD_RECORDS_FILE, prepare
from sfm.data.tokenizer import encode_word, load_tokenizer
from sfm.errors import SfmError
from sfm.io.codec import build_codec, load_run_config
from sfm.lm.layout import decode_record, encode_record

USER_SPEAKER = "SPEAKER_USER"
MIN_BUCKET_FRAMES = 16
WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random access for grain

SKIP_REASONS = {
    "too_short": "audio is shorter than one codec frame",
    "bad_channels": "audio has neither one nor two channels",
    "non_finite_audio": "audio has NaN or Inf samples",
}
TOKENIZE_BAD_RECORDS_FILE = "bad_records.jsonl"  # this stage's skips, one JSON line each


class TokenizeError(SfmError, ValueError):
    """Input that cannot be tokenized at all; the message names the directory."""


class DataSource(Protocol):
    """What `builder.as_data_source(split)` returns: sized and indexable."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> dict[str, Any]: ...


def _counts(counts: Counter[str]) -> str:
    """`key n, key n` sorted by key, or "none"."""
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items()) if n) or "none"


@dataclass
class Summary:
    """What one tokenization run did (shards skipped as complete are not re-counted).

    `skipped` is this stage's skips in the shards written this run; `prepare_skipped` is what
    the prepare stage skipped (from its bad_records.json files; None when no builder has one).
    """

    out_dir: Path
    records: Counter[str] = field(default_factory=Counter)  # per split, written this run
    skipped: Counter[str] = field(default_factory=Counter)  # by SKIP_REASONS key
    shards_written: int = 0
    shards_done_before: int = 0
    dropped_tokens: int = 0
    seconds: float = 0.0
    prepare_skipped: Counter[str] | None = None  # by sfm.data.corpus.REASONS key
    bad_records_files: list[Path] = field(default_factory=list)  # both stages' files

    @property
    def skipped_total(self) -> int:
        """Records skipped at every stage."""
        return self.skipped.total() + (self.prepare_skipped or Counter()).total()

    def line(self) -> str:
        """One-line report for the command line."""
        records = ", ".join(f"{s} {n}" for s, n in sorted(self.records.items())) or "none"
        prep = "not recorded" if self.prepare_skipped is None else _counts(self.prepare_skipped)
        skipped = f"{self.skipped_total} (prepare: {prep}; tokenize: {_counts(self.skipped)})"
        files = ", ".join(str(p) for p in self.bad_records_files) or "none"
        return (
            f"{self.out_dir}: records {records}; shards written {self.shards_written}, "
            f"already complete {self.shards_done_before}; skipped {skipped}; "
            f"bad records: {files}; "
            f"text tokens dropped past the end {self.dropped_tokens}; {self.seconds:.1f} s"
        )


# ---------------------------------------------------------------- inputs


def _has_data_source(x: object) -> bool:
    """True for a tfds builder (anything with as_data_source)."""
    return hasattr(x, "as_data_source")


def _corpus_is_stereo(corpus: Path) -> bool:
    """True when the first readable audio file the corpus's manifest lists has two channels."""
    _, root = corpus_manifest(corpus)
    for entry in manifest_entries(corpus):
        if isinstance(entry, tuple):
            try:
                return sf.info(str(root / entry[0])).channels == 2  # an absolute path stays
            except RuntimeError:
                continue
    return False


def resolve_builders(data: Any, out_dir: Path) -> list[Any]:
    """Builders of a builder, a corpus (a folder with manifest.jsonl or a manifest file such as
    moshi-finetune's train.jsonl; prepared into out_dir/tfds) or a prepared tfds dir."""
    if _has_data_source(data):
        return [data]
    path = Path(data)
    manifest, _ = corpus_manifest(path)
    if manifest.is_file():
        return [prepare(path, out_dir / "tfds", stereo=_corpus_is_stereo(path))[0]]
    import tensorflow_datasets as tfds  # heavy: only when reading a prepared directory

    info_dirs = sorted({p.parent for p in path.rglob("dataset_info.json")})
    if not info_dirs:
        raise TokenizeError(
            f"{path}: neither a corpus (manifest.jsonl, a .jsonl manifest) nor a prepared tfds dir"
        )
    return [tfds.builder_from_directory(str(d)) for d in info_dirs]


def prepare_bad_records(builders: Sequence[Any]) -> tuple[Counter[str] | None, list[Path]]:
    """What the prepare stage skipped, summed over builders, and the files that say so.

    `prepare` writes BAD_RECORDS_FILE into each builder's data_dir; the counts are None when no
    builder has one (an in-memory builder, or data prepared by other code).
    """
    counts: Counter[str] | None = None
    files = []
    for builder in builders:
        data_dir = getattr(builder, "data_dir", None)
        path = Path(data_dir) / BAD_RECORDS_FILE if data_dir else None
        if path is None or not path.is_file():
            continue
        counts = Counter() if counts is None else counts
        counts.update(BadRecords.from_json(json.loads(path.read_text())))
        files.append(path)
    return counts, files


def split_sources(builders: Sequence[Any]) -> dict[str, list[DataSource]]:
    """Data sources of each split name, across builders."""
    out: dict[str, list[DataSource]] = {}
    for builder in builders:
        for split in sorted(builder.info.splits.keys()):
            out.setdefault(split, []).append(builder.as_data_source(split))
    return out


def _example_refs(sources: Sequence[DataSource]) -> list[tuple[int, int]]:
    """(source index, example index) for every example of a split, in a fixed order."""
    return [(s, i) for s, src in enumerate(sources) for i in range(len(src))]


def _text(x: bytes | str) -> str:
    """tfds Text comes back as bytes."""
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def channel_words(example: dict[str, Any], channels: int) -> list[list[TimedWord]]:
    """Per-channel (word, start, end): the user's words on channel 1 when there is one."""
    out: list[list[TimedWord]] = [[] for _ in range(channels)]
    w = example["words"]
    for word, start, end, speaker in zip(w["word"], w["start"], w["end"], w["speaker"]):
        channel = 1 if channels == 2 and _text(speaker) == USER_SPEAKER else 0
        out[channel].append((_text(word), float(start), float(end)))
    return out


# ---------------------------------------------------------------- sharded encoding


class ShardedEncoder:
    """Encodes [B, T] audio with the batch sharded over this host's devices."""

    def __init__(self, model: Mimi, batch_size: int) -> None:
        devices = jax.local_devices()
        self.mesh = Mesh(np.array(devices), ("batch",))
        self.batch = math.ceil(batch_size / len(devices)) * len(devices)
        self.frame_size = model.cfg.frame_size
        graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, NamedSharding(self.mesh, PartitionSpec()))
        rows = NamedSharding(self.mesh, PartitionSpec("batch"))

        def encode(state: Any, wav_bt: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, state).encode(wav_bt)

        self._encode = jax.jit(encode, in_shardings=(None, rows), out_shardings=rows)
        self._rows = rows

    def _bucket(self, samples: int) -> int:
        """Padded length in samples: a power of two of frames, to bound recompiles."""
        frames = max(MIN_BUCKET_FRAMES, math.ceil(samples / self.frame_size))
        return (1 << (frames - 1).bit_length()) * self.frame_size

    def encode_rows(self, rows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each float32 row [T_i] -> codes int32 [K, ceil(T_i / frame_size)]."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out: list[np.ndarray] = [np.empty(0)] * len(rows)
        for lo in range(0, len(order), self.batch):
            chunk = order[lo : lo + self.batch]
            codes = self._encode_batch([rows[i] for i in chunk])
            for j, i in enumerate(chunk):
                out[i] = codes[j, :, : math.ceil(len(rows[i]) / self.frame_size)]
        return out

    def _encode_batch(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """Zero-pad rows to one bucketed length and a full batch, encode, gather."""
        wav_bt = np.zeros((self.batch, self._bucket(max(len(r) for r in rows))), np.float32)
        for j, r in enumerate(rows):
            wav_bt[j, : len(r)] = r
        codes = self._encode(self.state, jax.device_put(jnp.asarray(wav_bt), self._rows))
        return np.asarray(jax.device_get(codes))


# ---------------------------------------------------------------- records and shards


def record_bytes(codes_ckt: np.ndarray, text_ct: np.ndarray, frame_rate: float, path: str) -> bytes:
    """One example in the LM's record layout (`sfm.lm.layout.encode_record`)."""
    return encode_record(
        {
            "codes": codes_ckt.astype(np.int16),
            "text": text_ct.astype(np.int32),
            "frame_rate": np.float64(frame_rate),
            "path": np.str_(path),
        }
    )


def read_record(data: bytes) -> dict[str, Any]:
    """Inverse of record_bytes: codes, text, frame_rate (float), path (str)."""
    record = decode_record(data)
    return {
        "codes": record["codes"],
        "text": record["text"],
        "frame_rate": float(record["frame_rate"]),
        "path": str(record["path"]),
    }


def read_shard(path: PathLike) -> Iterator[dict[str, Any]]:
    """The records of one ArrayRecord shard, in order (see `read_record`)."""
    reader = ArrayRecordReader(str(path))
    try:
        for data in reader.read_all():
            yield read_record(data)
    finally:
        reader.close()


def shard_name(split: str, index: int, count: int) -> str:
    """`<split>-<i:05d>-of-<n:05d>.array_record`."""
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def write_shard(
    path: str | os.PathLike[str], records: Iterable[bytes], options: str = WRITER_OPTIONS
) -> str:
    """One ArrayRecord file of `records` in order; returns its path. Written to a temporary
    name, then renamed: a shard on disk is always complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = ArrayRecordWriter(str(tmp), options)
    for rec in records:
        writer.write(rec)
    writer.close()
    os.replace(tmp, path)
    return os.fspath(path)


@dataclass
class _Job:
    """Everything needed to turn examples into records."""

    encoder: ShardedEncoder
    encode_text: Callable[[str], list[int]]
    frame_rate: float
    summary: Summary
    skips: list[dict[str, str]] = field(default_factory=list)  # not yet in the bad-records file


def _check_audio(audio_tc: np.ndarray, frame_size: int) -> str | None:
    """A SKIP_REASONS key, or None for usable audio."""
    if audio_tc.ndim != 2 or audio_tc.shape[1] not in (1, 2):
        return "bad_channels"
    if audio_tc.shape[0] < frame_size:
        return "too_short"
    if audio_tc.dtype.kind in "fc" and not np.isfinite(audio_tc).all():
        return "non_finite_audio"  # tfds stores int16, but a builder may hand out floats
    return None


def shard_records(job: _Job, examples: Sequence[dict[str, Any]]) -> list[bytes]:
    """Records of one shard's examples; bad examples are skipped and counted."""
    good: list[dict[str, Any]] = []
    for ex in examples:
        reason = _check_audio(np.asarray(ex["audio"]), job.encoder.frame_size)
        if reason:
            job.summary.skipped[reason] += 1
            path = _text(ex.get("path", b"?"))
            job.skips.append(
                {"path": path, "reason": reason, "message": f"{path}: {SKIP_REASONS[reason]}"}
            )
        else:
            good.append(ex)
    rows = [
        np.asarray(ex["audio"], np.float32)[:, c] / 32768.0
        for ex in good
        for c in range(np.asarray(ex["audio"]).shape[1])
    ]
    codes = iter(job.encoder.encode_rows(rows))
    return [_record(job, ex, codes) for ex in good]


def _record(job: _Job, ex: dict[str, Any], codes: Iterator[np.ndarray]) -> bytes:
    """One example's record, taking its channels' codes from `codes`."""
    channels = np.asarray(ex["audio"]).shape[1]
    codes_ckt = np.stack([next(codes) for _ in range(channels)])
    texts = []
    for words in channel_words(ex, channels):
        text, dropped = place_words(words, codes_ckt.shape[2], job.frame_rate, job.encode_text)
        job.summary.dropped_tokens += dropped
        texts.append(text)
    return record_bytes(codes_ckt, np.stack(texts), job.frame_rate, _text(ex["path"]))


def _tokenize_split(job: _Job, split: str, sources: Sequence[DataSource], per_shard: int) -> None:
    """Write this host's missing shards of one split."""
    refs = _example_refs(sources)
    count = max(1, math.ceil(len(refs) / per_shard))
    for index in range(jax.process_index(), count, jax.process_count()):
        path = job.summary.out_dir / shard_name(split, index, count)
        if path.is_file():
            job.summary.shards_done_before += 1
            continue
        examples = [sources[s][i] for s, i in refs[index * per_shard : (index + 1) * per_shard]]
        records = shard_records(job, examples)
        write_shard(path, records)
        _write_skips(job, split, path.name)
        job.summary.shards_written += 1
        job.summary.records[split] += len(records)


def _tokenize_bad_records_path(out_dir: Path) -> Path:
    """This stage's bad-records file: one per host when there are several."""
    if jax.process_count() == 1:
        return out_dir / TOKENIZE_BAD_RECORDS_FILE
    stem, suffix = TOKENIZE_BAD_RECORDS_FILE.rsplit(".", 1)
    return out_dir / f"{stem}-{jax.process_index():05d}.{suffix}"


def _write_skips(job: _Job, split: str, shard: str) -> None:
    """Append the skips of a shard just written to this stage's bad-records file."""
    if not job.skips:
        return
    with _tokenize_bad_records_path(job.summary.out_dir).open("a", encoding="utf-8") as f:
        for skip in job.skips:
            row = {"stage": "tokenize", "split": split, "shard": shard, **skip}
            f.write(json.dumps(row) + "\n")
    job.skips.clear()


def tokenize_dataset(
    builder_or_source_dir: Any,
    out_dir: PathLike,
    codec_config: str | None = "tiny",
    checkpoint: PathLike | None = None,
    tokenizer_path: PathLike | None = None,
    records_per_shard: int = 256,
    batch_size: int = 16,
) -> Summary:
    """Tokenize every split of a builder, corpus dir or prepared dir into ArrayRecord shards."""
    t0, out = time.perf_counter(), Path(out_dir)
    if tokenizer_path is None:
        raise TokenizeError("a tokenizer model is required (sfm data train-tokenizer)")
    out.mkdir(parents=True, exist_ok=True)
    builders = resolve_builders(builder_or_source_dir, out)
    prepare_skipped, bad_files = prepare_bad_records(builders)
    sources = split_sources(builders)
    cfg = load_run_config(codec_config, checkpoint, ())
    sp = load_tokenizer(tokenizer_path)
    encoder = ShardedEncoder(build_codec(cfg, checkpoint), batch_size)
    summary = Summary(out, prepare_skipped=prepare_skipped, bad_records_files=bad_files)
    job = _Job(encoder, lambda w: encode_word(sp, w), float(cfg.codec.frame_rate), summary)
    for split, split_srcs in sources.items():
        _tokenize_split(job, split, split_srcs, records_per_shard)
    if _tokenize_bad_records_path(out).is_file():  # this run's skips or an earlier run's
        summary.bad_records_files.append(_tokenize_bad_records_path(out))
    job.summary.seconds = time.perf_counter() - t0
    return job.summary
