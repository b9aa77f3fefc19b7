"""End to end: synthetic corpora -> tfds -> codec and text shards -> the grain mixture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from sfm.data import pipeline as pl
from sfm.data.dialogues import synth_dialogues
from sfm.data.synth_corpus import synth_corpus
from sfm.data.text import sentences
from sfm.data.tfds_speech import prepare
from sfm.data.tokenize import read_record, tokenize_dataset
from sfm.data.tokenize_text import read_text_record, tokenize_text
from sfm.data.tokenizer import train_tokenizer, training_texts
from sfm.lm import layout as lay

K, SEQ, BATCH = 4, 48, 4  # the tiny codec's n_q; a window shorter than every utterance
DELAYS = lay.moshi_delays(K)
LAYOUT = lay.StreamLayout(n_q=K, delays=DELAYS)
Batch = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Mono utterances and two dialogues, tokenized by the tiny codec; text lines tokenized."""
    root = tmp_path_factory.mktemp("e2e")
    synth_corpus(root / "mono", minutes=12 / 60, engine="espeak", seed=1)
    synth_dialogues(root / "dia", minutes=0.1, seed=1)
    texts = sentences(60, 7)
    spm = train_tokenizer(training_texts([root / "mono", root / "dia"], []), root / "spm", 120)
    mono = prepare(root / "mono", root / "tfds", validation_fraction=0.0)[0]
    dia = prepare(root / "dia", root / "tfds", stereo=True, validation_fraction=0.0)[0]
    out = {"speech": root / "speech", "duplex": root / "duplex", "text": root / "text"}
    tokenize_dataset(mono, out["speech"], "tiny", None, spm, 2, 8)
    tokenize_dataset(dia, out["duplex"], "tiny", None, spm, 2, 8)
    tokenize_text(texts, out["text"], spm, seq_tokens=40, records_per_shard=8)
    return out


def _read(paths: Path, decode: Any) -> list[Any]:
    """Every record of the shards in a folder, decoded."""
    out = []
    for path in sorted(paths.glob("*.array_record")):
        reader = ArrayRecordReader(str(path))
        out += [decode(r) for r in reader.read_all()]
        reader.close()
    return out


def _config(shards: dict[str, Path], **kw: Any) -> pl.DataConfig:
    """All four sources over the test's shards."""
    glob = {k: (str(v / "*.array_record"),) for k, v in shards.items()}
    base = dict(
        text_paths=glob["text"],
        speech_paths=glob["speech"],
        interleaved_paths=glob["speech"],
        duplex_paths=glob["duplex"],
        seq_len=SEQ,
        batch_size=BATCH,
        shard_index=0,
        shard_count=1,
    )
    return pl.DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def batches(shards: dict[str, Path]) -> list[Batch]:
    """The first batches of the four-source mixture."""
    it = iter(pl.build_dataset(_config(shards), LAYOUT))
    out = [next(it) for _ in range(10)]
    it.close()
    return out


def _elements(batches: list[Batch], source: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens [S, SEQ], mask [S, SEQ]) of every element of one source."""
    k = pl.SOURCES.index(source)
    return [
        (b["tokens"][i], b["mask"][i]) for b in batches for i in np.flatnonzero(b["source"] == k)
    ]


def _find_window(streams: np.ndarray, record: dict[str, Any]) -> bool:
    """True when undelayed streams [S, L] equal the record's text and codes at some frame."""
    codes, text = record["codes"].astype(np.int32), record["text"]
    length = streams.shape[1]
    for start in range(codes.shape[2] - length + 1):
        stop = start + length
        model = np.concatenate([text[:1, start:stop], codes[0, :K, start:stop]])
        user = codes[1, :K, start:stop] if len(codes) == 2 else np.full((K, length), -1)
        if np.array_equal(streams, np.concatenate([model, user])):
            return True
    return False


def test_batches_have_every_source(batches: list[Batch]) -> None:
    for batch in batches:
        assert batch["tokens"].shape == batch["mask"].shape == (BATCH, 1 + 2 * K, SEQ)
        assert batch["tokens"].dtype == np.int32 and batch["mask"].dtype == bool
        assert not batch["mask"][:, 1 + K :].any()
    sources = np.concatenate([b["source"] for b in batches])
    assert set(sources.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("source, folder", [("speech", "speech"), ("duplex", "duplex")])
def test_windows_are_record_frames(
    batches: list[Batch], shards: dict[str, Path], source: str, folder: str
) -> None:
    records = _read(shards[folder], read_record)
    assert {len(r["codes"]) for r in records} == {2 if source == "duplex" else 1}
    for tokens, mask in _elements(batches, source):
        streams = lay.undo_delays(tokens, DELAYS)  # [S, SEQ - 1], every frame real
        assert any(_find_window(streams, r) for r in records)
        assert mask[: 1 + K].sum() >= (1 + K) * (SEQ - 1)
        if source == "duplex":
            assert (streams[1 + K :] >= 0).all()


def test_text_elements_hold_only_text(batches: list[Batch], shards: dict[str, Path]) -> None:
    texts = _read(shards["text"], read_text_record)
    assert max(map(len, texts)) <= SEQ  # so every element is one whole sequence, padded
    for tokens, mask in _elements(batches, "text"):
        assert (tokens[1:] == -1).all() and not mask[1:].any()
        real = tokens[0][mask[0]]
        assert (tokens[0][len(real) :] == -1).all() and mask[0, : len(real)].all()
        assert any(np.array_equal(real, t) for t in texts)


def test_interleaved_switches_modality(batches: list[Batch]) -> None:
    spans = []
    for tokens, _ in _elements(batches, "interleaved"):
        streams = lay.undo_delays(tokens, DELAYS)
        text_span = (streams[1:] == -1).all(0)  # no audio: a text span
        assert (streams[0, ~text_span] == lay.TEXT_PAD).all()
        spans.append(text_span)
    assert np.concatenate(spans).any() and not np.concatenate(spans).all()


def test_resume_after_state(shards: dict[str, Path]) -> None:
    cfg = _config(shards, seed=3)
    it = iter(pl.build_dataset(cfg, LAYOUT))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    it.close()
    fresh = iter(pl.build_dataset(cfg, LAYOUT))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    fresh.close()
