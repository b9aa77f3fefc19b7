"""Stream layout and grain pipelines: shapes, masks, mixture weights, sharding, exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sfm.data import pipeline as pl
from sfm.data.tokenize import write_shard
from sfm.lm import layout as lay
from sfm.testing.records import speech_record

K, SEQ = 4, 40
DELAYS = lay.moshi_delays(K)
LAYOUT = lay.StreamLayout(n_q=K, delays=DELAYS)


def fake_record(rng: np.random.Generator, channels: int, frames: int, idx: int) -> bytes:
    """One tokenized record with a unique path."""
    return speech_record(rng, channels, frames, path=f"utt{idx}.wav")


def write_shards(root: Path, name: str, channels: int, n: int, n_shards: int = 2) -> str:
    """Write n records over n_shards ArrayRecord files; returns their glob."""
    rng = np.random.default_rng(channels * 100 + n)
    for i in range(n_shards):
        records = [
            fake_record(rng, channels, int(rng.integers(20, 80)), j) for j in range(i, n, n_shards)
        ]
        write_shard(root / f"{name}-{i:05d}-of-{n_shards:05d}.array_record", records)
    return str(root / f"{name}-*.array_record")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Mono and stereo fixture shards."""
    root = tmp_path_factory.mktemp("shards")
    return {"mono": write_shards(root, "mono", 1, 40), "stereo": write_shards(root, "st", 2, 30)}


def config(shards: dict[str, str], **kw: object) -> pl.DataConfig:
    """A small config over all four sources."""
    base = dict(
        speech_paths=(shards["mono"],),
        interleaved_paths=(shards["mono"],),
        duplex_paths=(shards["stereo"],),
        seq_len=SEQ,
        batch_size=4,
        shard_index=0,
        shard_count=1,
    )
    return pl.DataConfig(**{**base, **kw})


TEXTS = [np.arange(5, 5 + n, dtype=np.int32) for n in (10, 30, 60, 90)]


def test_delays_round_trip() -> None:
    tokens = np.random.default_rng(0).integers(0, 2048, size=(1 + 2 * K, 17)).astype(np.int32)
    delayed = lay.apply_delays(tokens, (0, 0, 1, 2, 3, 0, 1, 1, 2), -1)
    assert delayed.shape == (9, 20)
    assert (delayed[3, :2] == -1).all() and (delayed[3, 2:19] == tokens[3]).all()
    np.testing.assert_array_equal(lay.undo_delays(delayed, (0, 0, 1, 2, 3, 0, 1, 1, 2)), tokens)
    assert lay.StreamLayout().n_streams == 17 and lay.StreamLayout().delays == lay.moshi_delays(8)
    with pytest.raises(ValueError):
        lay.StreamLayout(n_q=4)


def test_to_streams_mono_and_dialogue() -> None:
    rng, layout = np.random.default_rng(1), lay.StreamLayout(n_q=K, delays=DELAYS)
    mono = lay.decode_record(fake_record(rng, 1, 12, 0))
    tokens, mask = lay.to_streams(mono, layout)
    assert tokens.shape == (1 + 2 * K, 12) and tokens.dtype == np.int32
    assert (tokens[1 + K :] == -1).all() and not mask[1 + K :].any() and mask[: 1 + K].all()
    duo = lay.decode_record(fake_record(rng, 2, 12, 1))
    tokens, mask = lay.to_streams(duo, layout)
    np.testing.assert_array_equal(tokens[0], duo["text"][0])
    np.testing.assert_array_equal(tokens[1 + K :], duo["codes"][1, :K])
    assert not mask[1 + K :].any()


def test_interleave_spans() -> None:
    rng, layout = np.random.default_rng(2), lay.StreamLayout(n_q=K, delays=DELAYS)
    tokens, mask = lay.to_streams(lay.decode_record(fake_record(rng, 1, 200, 0)), layout)
    out, out_mask = lay.interleave(tokens, mask, layout, rng, 0.5)
    text_span = (out[1:] == -1).all(0)
    speech_span = (out[0] == lay.TEXT_PAD) & ~out_mask[0]
    assert (text_span ^ speech_span).all() and text_span.any() and speech_span.any()
    np.testing.assert_array_equal(out[0, text_span], tokens[0, text_span])
    assert (out_mask[0] == text_span).all() and (out_mask[1 : 1 + K] == speech_span).all()


def test_windows_from_the_first_frame() -> None:
    """`p_from_start` of the windows open at the record's first frame (a dialogue's opening,
    the delayed streams' initial tokens included); the rest start anywhere."""
    rng = np.random.default_rng(5)
    item = lay.to_streams(lay.decode_record(fake_record(rng, 2, 200, 0)), LAYOUT)
    first = lay.crop_or_pad(*lay.delay_streams(*item, LAYOUT), SEQ, LAYOUT.ignore, 0)["tokens"]

    def share_from_start(p: float) -> float:
        kw = dict(layout=LAYOUT, seq_len=SEQ, source=3, delayed=True, p_from_start=p)
        windows = [pl.window(item, rng, **kw)["tokens"] for _ in range(400)]
        return float(np.mean([np.array_equal(w, first) for w in windows]))

    assert share_from_start(1.0) == 1.0
    assert 0.15 < share_from_start(0.25) < 0.35  # 100 of 400 expected, sd 8.7
    assert share_from_start(0.0) < 0.03  # 1 start in 162
    with pytest.raises(ValueError, match="data.p_from_start"):
        pl.DataConfig(p_from_start=1.5)


def _one_source(shards: dict[str, str], source: str) -> dict[str, np.ndarray]:
    """First batch of a pipeline with only `source` enabled."""
    weights = tuple(float(s == source) for s in pl.SOURCES)
    return next(iter(pl.build_dataset(config(shards, weights=weights), LAYOUT, TEXTS)))


@pytest.mark.parametrize("source", pl.SOURCES)
def test_each_source_shapes_and_masks(shards: dict[str, str], source: str) -> None:
    batch = _one_source(shards, source)
    tokens, mask = batch["tokens"], batch["mask"]
    assert tokens.shape == mask.shape == (4, 1 + 2 * K, SEQ) and tokens.dtype == np.int32
    assert (batch["source"] == pl.SOURCES.index(source)).all()
    assert (tokens[~mask & (tokens >= -1)] >= -1).all() and (tokens[mask] >= 0).all()
    assert ((tokens == lay.INITIAL) == _initial_prefix(tokens)).all()
    assert not mask[:, 1 + K :].any()  # user streams never carry loss
    if source == "text":
        assert (tokens[:, 1:] == -1).all() and mask[:, 0].any()
    if source == "duplex":
        assert (tokens[:, 1 + K :] >= 0).any()
    if source == "speech":
        assert np.isin(tokens[:, 1 + K :], (-1, lay.INITIAL)).all()


def _initial_prefix(tokens: np.ndarray) -> np.ndarray:
    """Where INITIAL may appear: the first `delay` frames of each stream of a window that
    starts at its record's first frame (any frame 0 holding INITIAL marks such a window)."""
    out = np.zeros(tokens.shape, bool)
    for b in range(tokens.shape[0]):
        if (tokens[b, :, 0] == lay.INITIAL).any():
            for s, d in enumerate(DELAYS):
                out[b, s, :d] = True
    return out


def test_mixture_proportions(shards: dict[str, str]) -> None:
    cfg = config(shards, weights=(1.0, 2.0, 1.0, 4.0), batch_size=5)
    it = iter(pl.build_dataset(cfg, LAYOUT, TEXTS))
    sources = np.concatenate([next(it)["source"] for _ in range(100)])
    frac = np.bincount(sources, minlength=4) / len(sources)
    np.testing.assert_allclose(frac, np.array([1, 2, 1, 4]) / 8, atol=0.03)


def test_host_sharding_disjoint_and_covering(shards: dict[str, str]) -> None:
    paths = config(shards).paths("speech")
    seen = [
        {lay.decode_record(r)["path"].item() for r in pl.sharded_records(paths, (i, 2))}
        for i in (0, 1)
    ]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 40


def test_hosts_together_make_the_one_host_batches(shards: dict[str, str]) -> None:
    one = iter(pl.build_dataset(config(shards, batch_size=4, shard_index=0, shard_count=1), LAYOUT))
    hosts = [
        iter(pl.build_dataset(config(shards, batch_size=4, shard_index=i, shard_count=2), LAYOUT))
        for i in (0, 1)
    ]
    for _ in range(3):
        whole, halves = next(one), [next(h) for h in hosts]
        assert all(h["tokens"].shape[0] == 2 for h in halves)
        for key in ("tokens", "mask", "source"):
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
    with pytest.raises(ValueError, match="data.batch_size"):
        pl.build_dataset(config(shards, batch_size=5, shard_index=0, shard_count=2), LAYOUT)


def test_deterministic_with_seed(shards: dict[str, str]) -> None:
    def first(seed: int) -> np.ndarray:
        it = iter(pl.build_dataset(config(shards, seed=seed), LAYOUT, TEXTS))
        return np.stack([next(it)["tokens"] for _ in range(3)])

    np.testing.assert_array_equal(first(3), first(3))
    assert not np.array_equal(first(3), first(4))


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(shards: dict[str, str], workers: int) -> None:
    cfg = config(shards, num_workers=workers)
    it = iter(pl.build_dataset(cfg, LAYOUT, TEXTS))
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = iter(pl.build_dataset(cfg, LAYOUT, TEXTS))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def _broken_speech() -> dict[str, list[bytes]]:
    """Deliberately broken speech records, by the reason the pipeline should give."""
    text, codes = np.zeros((1, 30), np.int32), np.zeros((1, 8, 30), np.int16)
    return {
        "bad_npz": [b"not an npz at all", np.random.default_rng(0).bytes(200)],
        "missing_key": [lay.encode_record({"text": text, "frame_rate": 12.5})],
        "bad_shapes": [
            lay.encode_record({"codes": np.zeros((3, 8, 30), np.int16), "text": text}),
            lay.encode_record({"codes": codes, "text": np.zeros((1, 29), np.int32)}),
            lay.encode_record({"codes": np.zeros((1, 2, 30), np.int16), "text": text}),
        ],
        "empty": [lay.encode_record({"codes": codes[..., :0], "text": text[:, :0]})],
    }


def _broken_text() -> dict[str, list[bytes]]:
    """Deliberately broken text records, by reason."""
    return {
        "bad_npz": [b"garbage"],
        "missing_key": [lay.encode_record({"codes": np.zeros(3)})],
        "bad_shapes": [lay.encode_record({"tokens": np.zeros((2, 5), np.int32)})],
        "empty": [lay.encode_record({"tokens": np.zeros(0, np.int32)})],
    }


def _shuffled(good: list[bytes], broken: dict[str, list[bytes]], seed: int) -> list[bytes]:
    """Good and broken records in a random order."""
    records = good + [r for rs in broken.values() for r in rs]
    return [records[i] for i in np.random.default_rng(seed).permutation(len(records))]


def test_bad_records_skipped_and_counted(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    speech = [fake_record(rng, 1, 50, i) for i in range(6)]
    text = [lay.encode_record({"tokens": np.arange(4, 60, dtype=np.int32)})] * 3
    mono = write_shard(tmp_path / "mono.array_record", _shuffled(speech, _broken_speech(), 0))
    texts = write_shard(tmp_path / "text.array_record", _shuffled(text, _broken_text(), 1))
    paths = {"mono": mono, "stereo": mono}
    for source, good, broken in (
        ("speech", speech, _broken_speech()),
        ("text", text, _broken_text()),
    ):
        cfg = config(
            paths, text_paths=(texts,), weights=tuple(float(s == source) for s in pl.SOURCES)
        )
        pl.BAD_RECORDS.reset()
        n = len(good) + sum(map(len, broken.values()))
        epoch = [pl.mixture(cfg, LAYOUT)[i] for i in range(n)]  # in-process: exact counts
        assert sum(e is not None for e in epoch) == len(good)
        assert pl.bad_record_counts() == {k: len(v) for k, v in broken.items()}
    it = iter(pl.build_dataset(config(paths, weights=(0.0, 1.0, 0.0, 0.0)), LAYOUT))
    for _ in range(4):  # batches hold only windows of good records, epoch after epoch
        mask = next(it)["mask"]
        assert mask.shape == (4, 1 + 2 * K, SEQ) and (mask[:, : 1 + K].sum(-1) >= SEQ - 1).all()
    it.close()
