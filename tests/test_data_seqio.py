"""seqio Tasks over the grain pipeline's shards: same layout functions, same examples."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

from sfm.data import pipeline as pl
from sfm.data.seqio_tasks import (
    SeqioUnavailableError,
    mixture_name,
    register_tasks,
    task_name,
)
from sfm.data.tokenize import write_shard
from sfm.lm import layout as lay
from sfm.testing.records import speech_record

seqio = pytest.importorskip("seqio")

K, SEQ, N_EXAMPLES = 4, 40, 40
DELAYS = lay.moshi_delays(K)
LAYOUT = lay.StreamLayout(n_q=K, delays=DELAYS)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> pl.DataConfig:
    """All four sources over small mono, stereo and text shards."""
    root, rng = tmp_path_factory.mktemp("seqio"), np.random.default_rng(0)
    mono = write_shard(
        root / "mono.ar", [speech_record(rng, 1, int(rng.integers(20, 80))) for _ in range(8)]
    )
    stereo = write_shard(
        root / "st.ar", [speech_record(rng, 2, int(rng.integers(20, 80))) for _ in range(6)]
    )
    texts = [lay.encode_record({"tokens": np.arange(5, 5 + n, dtype=np.int32)}) for n in (9, 70)]
    text = write_shard(root / "text.ar", [*texts, b"a broken record"])
    return pl.DataConfig(
        text_paths=(text,),
        speech_paths=(mono,),
        interleaved_paths=(mono,),
        duplex_paths=(stereo,),
        weights=(1.0, 1.0, 1.0, 2.0),
        seq_len=SEQ,
        shard_index=0,
        shard_count=1,
    )


@pytest.fixture(scope="module")
def examples(cfg: pl.DataConfig) -> list[dict[str, np.ndarray]]:
    """The first examples of the registered mixture."""
    names = register_tasks(cfg, LAYOUT, prefix="sfm_test")
    assert names == [*(task_name("sfm_test", s) for s in pl.SOURCES), mixture_name("sfm_test")]
    mixture = seqio.get_mixture_or_task(mixture_name("sfm_test"))
    ds = mixture.get_dataset(None, split="train", shuffle=True, seed=1, num_epochs=None)
    return list(ds.take(N_EXAMPLES).as_numpy_iterator())


def _records(cfg: pl.DataConfig, source: str) -> list[Any]:
    """The undelayed (tokens, mask) of each good record of a source."""
    decode, _ = pl.source_fns(cfg, LAYOUT, source)
    items = (decode(r) for r in pl.sharded_records(cfg.paths(source), (0, 1)))
    return [item for item in items if item is not None]


def _grain_windows(cfg: pl.DataConfig, source: str, item: Any) -> list[dict[str, np.ndarray]]:
    """Every window the grain pipeline's layout functions can make of one record."""
    tokens, mask = item
    if source != "text":
        tokens, mask = lay.delay_streams(tokens, mask, LAYOUT)
    starts = range(max(tokens.shape[1] - SEQ, 0) + 1)
    return [lay.crop_or_pad(tokens, mask, SEQ, -1, s) for s in starts]


def test_examples_shapes_and_sources(examples: list[dict[str, np.ndarray]]) -> None:
    for ex in examples:
        assert ex["tokens"].shape == ex["mask"].shape == (1 + 2 * K, SEQ)
        assert ex["tokens"].dtype == np.int32 and ex["mask"].dtype == bool
        assert not ex["mask"][1 + K :].any()
    assert {int(ex["source"]) for ex in examples} == {0, 1, 2, 3}


@pytest.mark.parametrize("source", ["text", "speech", "duplex"])
def test_examples_equal_grain_layout(
    cfg: pl.DataConfig, examples: list[dict[str, np.ndarray]], source: str
) -> None:
    windows = [w for item in _records(cfg, source) for w in _grain_windows(cfg, source, item)]
    mine = [ex for ex in examples if ex["source"] == pl.SOURCES.index(source)]
    assert mine
    for ex in mine:
        assert any(
            np.array_equal(ex["tokens"], w["tokens"]) and np.array_equal(ex["mask"], w["mask"])
            for w in windows
        )


def test_interleaved_spans(examples: list[dict[str, np.ndarray]]) -> None:
    for ex in (e for e in examples if e["source"] == pl.SOURCES.index("interleaved")):
        streams = lay.undo_delays(ex["tokens"], DELAYS)
        text_span = (streams[1:] == -1).all(0)
        assert (streams[0, ~text_span] == lay.TEXT_PAD).all()


def test_registering_twice_replaces(cfg: pl.DataConfig) -> None:
    register_tasks(cfg, LAYOUT, prefix="sfm_twice")
    mixture = seqio.get_mixture_or_task(register_tasks(cfg, LAYOUT, prefix="sfm_twice")[-1])
    rates = {task.name: mixture.get_rate(task) for task in mixture.tasks}
    assert rates == {task_name("sfm_twice", s): w for s, w in zip(pl.SOURCES, cfg.weights)}


def test_missing_seqio_is_one_clear_error(
    cfg: pl.DataConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "seqio", None)
    with pytest.raises(SeqioUnavailableError, match=r"pip install 'sfm\[seqio\]'"):
        register_tasks(cfg, LAYOUT)
