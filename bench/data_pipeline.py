"""grain data pipeline throughput: in-process (0 workers) vs worker processes.

Builds fixture shards in the real record format (random codes and text streams at 12.5 Hz:
mono 20-60 s utterances, stereo dialogues, packed text sequences), then times the
four-source mixture and prints examples/s and frames/s (frames = batch * seq_len) per
worker count, and the speed-up of the last count over 0 workers.

    PYTHONPATH=. python bench/data_pipeline.py --workers 0 2 --seconds 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sfm.host

sfm.host.configure()  # before anything imports jax

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from sfm.data import pipeline as pl  # noqa: E402
from sfm.data.tokenize import shard_name, write_shard  # noqa: E402
from sfm.data.tokenize_text import text_record_bytes  # noqa: E402
from sfm.lm import layout as lay  # noqa: E402
from sfm.testing.records import FRAME_RATE, speech_record  # noqa: E402

RECORDS_PER_SHARD = 64


def _speech_record(rng: np.random.Generator, channels: int, index: int) -> bytes:
    """One record like `sfm data tokenize` writes: 8 codebooks, text with word marks."""
    frames = int(rng.uniform(20, 60) * FRAME_RATE)
    path = f"bench/{channels}ch/{index:05d}.wav"
    return speech_record(rng, channels, frames, text_vocab=32000, p_pad=0.5, p_epad=0.1, path=path)


def _write(out: Path, split: str, records: list[bytes]) -> str:
    """Write records over shards named like the tokenizer's; returns their glob."""
    count = -(-len(records) // RECORDS_PER_SHARD)
    for i in range(count):
        chunk = records[i * RECORDS_PER_SHARD : (i + 1) * RECORDS_PER_SHARD]
        write_shard(out / shard_name(split, i, count), chunk)
    return str(out / f"{split}-*.array_record")


def make_shards(out: Path, n_mono: int, n_stereo: int, n_text: int, seed: int) -> dict[str, str]:
    """Mono, stereo and text fixture shards under `out`; their globs by kind."""
    rng = np.random.default_rng(seed)
    mono = [_speech_record(rng, 1, i) for i in range(n_mono)]
    stereo = [_speech_record(rng, 2, i) for i in range(n_stereo)]
    text = [text_record_bytes(rng.integers(4, 32000, size=250)) for _ in range(n_text)]
    return {
        "mono": _write(out, "mono", mono),
        "stereo": _write(out, "stereo", stereo),
        "text": _write(out, "text", text),
    }


def config(globs: dict[str, str], args: argparse.Namespace, workers: int) -> pl.DataConfig:
    """The four-source mixture over the fixture shards."""
    return pl.DataConfig(
        text_paths=(globs["text"],),
        speech_paths=(globs["mono"],),
        interleaved_paths=(globs["mono"],),
        duplex_paths=(globs["stereo"],),
        seq_len=args.seq_len,
        batch_size=args.batch,
        shard_index=0,
        shard_count=1,
        num_workers=workers,
    )


def measure(cfg: pl.DataConfig, seconds: float, warmup: int) -> dict[str, float]:
    """Batches per second after `warmup` batches (worker start-up excluded)."""
    t0 = time.perf_counter()
    it = iter(pl.build_dataset(cfg, lay.StreamLayout()))  # Moshi 7B's 8 + 8 codebooks
    for _ in range(warmup):
        next(it)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        next(it)
        n += 1
    elapsed = time.perf_counter() - start
    it.close()
    examples = n * cfg.batch_size / elapsed
    return {
        "workers": cfg.num_workers,
        "startup_s": start - t0,
        "batches": n,
        "examples_per_s": examples,
        "frames_per_s": examples * cfg.seq_len,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="counts to time")
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per count")
    p.add_argument("--warmup", type=int, default=20, help="batches before timing")
    p.add_argument("--mono", type=int, default=200, help="mono records (20-60 s)")
    p.add_argument("--stereo", type=int, default=50, help="stereo records (20-60 s)")
    p.add_argument("--text", type=int, default=400, help="text sequences of 250 tokens")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=250)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    """Build the shards, time each worker count, print one line each and the ratio."""
    args = parse_args(argv)
    flags.FLAGS(sys.argv[:1])  # grain workers read absl flags: parse them before they start
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sfm_bench_data_") as tmp:
        t0 = time.perf_counter()
        globs = make_shards(Path(tmp), args.mono, args.stereo, args.text, seed=0)
        print(f"fixture shards: {time.perf_counter() - t0:.1f} s, {os.cpu_count()} CPUs")
        for workers in args.workers:
            r = measure(config(globs, args, workers), args.seconds, args.warmup)
            results.append(r)
            print(
                f"workers={workers}: {r['examples_per_s']:.1f} examples/s, "
                f"{r['frames_per_s']:.0f} frames/s ({r['batches']} batches, "
                f"start-up {r['startup_s']:.1f} s)"
            )
    ratio = results[-1]["examples_per_s"] / results[0]["examples_per_s"]
    print(f"ratio workers={args.workers[-1]} / workers={args.workers[0]}: {ratio:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps({"results": results, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
