"""End to end: synthetic corpora -> tfds -> tokenizer -> sharded codec tokenization."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from array_record.python.array_record_module import ArrayRecordReader

from sfm.cli import main
from sfm.data.dialogues import synth_dialogues
from sfm.data.synth_corpus import synth_corpus
from sfm.data.text import sentences
from sfm.data.tfds_speech import prepare
from sfm.data.tokenize import Summary, read_record, tokenize_dataset
from sfm.data.tokenize_text import pack_lines, read_text_record, tokenize_text
from sfm.data.tokenizer import (
    EPAD_PIECE,
    decode_stream,
    load_tokenizer,
    train_tokenizer,
    training_texts,
)
from sfm.io.codec import build_codec, load_run_config
from sfm.lm.layout import TEXT_EPAD, TEXT_PAD

PER_SHARD = 3


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A ~20 s mono corpus and ~30 s of dialogues."""
    root = tmp_path_factory.mktemp("corpora")
    synth_corpus(root / "mono", minutes=20 / 60, engine="espeak", seed=0)
    synth_dialogues(root / "dia", minutes=30 / 60, seed=0)
    return {"mono": root / "mono", "dia": root / "dia"}


@pytest.fixture(scope="module")
def tokenizer(corpora: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small-vocabulary tokenizer trained on both corpora's words."""
    texts = training_texts([corpora["mono"], corpora["dia"]], [])
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "spm", 120)


@pytest.fixture(scope="module")
def builders(corpora: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """The corpora prepared with tfds."""
    data_dir = tmp_path_factory.mktemp("tfds")
    return [prepare(corpora["mono"], data_dir)[0], prepare(corpora["dia"], data_dir, True)[0]]


@pytest.fixture(scope="module")
def tokenized(
    builders: list[Any], tokenizer: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Summary]:
    """The dialogues tokenized on the 8 simulated devices, three records per shard."""
    out = tmp_path_factory.mktemp("tokens")
    return out, tokenize_dataset(builders[1], out, "tiny", None, tokenizer, PER_SHARD, 4)


def _records(path: Path) -> list[dict[str, Any]]:
    """All records of one shard, decoded."""
    reader = ArrayRecordReader(str(path))
    try:
        return [read_record(r) for r in reader.read_all()]
    finally:
        reader.close()


def _all_records(out: Path) -> dict[str, dict[str, Any]]:
    """Every record of every shard, by path."""
    return {r["path"]: r for p in sorted(out.glob("*.array_record")) for r in _records(p)}


def test_tokenizer_reserves_pad_ids(tokenizer: Path) -> None:
    sp = load_tokenizer(tokenizer)
    assert sp.id_to_piece(TEXT_EPAD) == EPAD_PIECE and sp.pad_id() == TEXT_PAD
    ids = sp.encode("hello world, the quick brown fox")
    assert ids and TEXT_EPAD not in ids and TEXT_PAD not in ids


def test_decode_stream_leaves_out_pads_and_ids_without_a_piece(tokenizer: Path) -> None:
    sp = load_tokenizer(tokenizer)
    words = sp.encode("the quick brown fox")
    size = sp.get_piece_size()
    # as an LM samples it: pads, a masked frame, ids past the tokenizer (a 512-id text head)
    stream = [TEXT_PAD, TEXT_EPAD, words[0], -1, size, *words[1:], size + 7, TEXT_PAD]
    assert decode_stream(sp, stream) == "the quick brown fox"
    with pytest.raises(IndexError):  # what the raw decode does with the same stream
        sp.decode([t for t in stream if t >= 0 and t not in (TEXT_PAD, TEXT_EPAD)])


def test_records_match_audio(tokenized: tuple[Path, Summary], builders: list[Any]) -> None:
    out, summary = tokenized
    assert jax.local_device_count() == 8
    source = builders[1].as_data_source("train")
    records = _all_records(out)
    assert summary.records["train"] == len(source) and not summary.skipped
    frame_size = load_run_config("tiny", None, ()).codec.frame_size
    for i in range(len(source)):
        ex = source[i]
        rec = records[ex["path"].decode()]
        n_frames = math.ceil(ex["audio"].shape[0] / frame_size)
        assert rec["codes"].shape == (2, 4, n_frames) and rec["codes"].dtype == np.int16
        assert rec["text"].shape == (2, n_frames) and rec["frame_rate"] == 50.0


def test_text_has_epad_before_each_word(tokenized: tuple[Path, Summary]) -> None:
    for rec in _all_records(tokenized[0]).values():
        for text in rec["text"]:
            words = np.flatnonzero((text[1:] > TEXT_PAD) & (text[:-1] == TEXT_EPAD))
            assert len(words) > 0  # both speakers talk in every dialogue
            epads = np.flatnonzero(text == TEXT_EPAD)
            assert np.all(text[np.minimum(epads + 1, len(text) - 1)] > TEXT_PAD)


def test_sharded_codes_equal_single_device_encode(
    tokenized: tuple[Path, Summary], builders: list[Any]
) -> None:
    cfg = load_run_config("tiny", None, ())
    model = build_codec(cfg)
    ex = builders[1].as_data_source("train")[0]
    rec = _all_records(tokenized[0])[ex["path"].decode()]
    wav_bt = jnp.asarray(ex["audio"].T.astype(np.float32) / 32768.0)
    with jax.default_device(jax.devices()[0]):
        codes = np.asarray(model.encode(wav_bt))
    np.testing.assert_array_equal(rec["codes"], codes)


def test_resume_rewrites_only_missing_shard(
    tokenized: tuple[Path, Summary], builders: list[Any], tokenizer: Path
) -> None:
    out, first = tokenized
    shards = sorted(out.glob("*.array_record"))
    assert len(shards) == first.shards_written >= 2
    before = {p.name: p.read_bytes() for p in shards}
    victim = shards[1]
    victim.unlink()
    again = tokenize_dataset(builders[1], out, "tiny", None, tokenizer, PER_SHARD, 4)
    assert again.shards_written == 1 and again.shards_done_before == len(shards) - 1
    assert {p.name: p.read_bytes() for p in out.glob("*.array_record")} == before


def test_mono_corpus_dir(corpora: dict[str, Path], tokenizer: Path, tmp_path: Path) -> None:
    summary = tokenize_dataset(corpora["mono"], tmp_path, "tiny", None, tokenizer, 100, 8)
    records = _all_records(tmp_path)
    assert len(records) == sum(summary.records.values()) > 0
    for rec in records.values():
        assert rec["codes"].shape[0] == 1 and rec["text"].shape[0] == 1
        assert np.any(rec["text"] == TEXT_EPAD)


class _FakeBuilder:
    """An in-memory builder: one good, one too-short and one NaN (float) stereo example."""

    class info:  # noqa: N801 - mimics tfds's builder.info.splits
        splits = {"train": None}

    def __init__(self, good: dict[str, Any]) -> None:
        short = {**good, "audio": good["audio"][:100], "path": b"short.wav"}
        nan = good["audio"].astype(np.float32)
        nan[10, 1] = np.nan
        self.examples = [good, short, {**good, "audio": nan, "path": b"nan.wav"}]

    def as_data_source(self, split: str) -> list[dict[str, Any]]:
        return self.examples


def test_bad_examples_are_skipped_and_counted(
    builders: list[Any], tokenizer: Path, tmp_path: Path
) -> None:
    fake = _FakeBuilder(builders[1].as_data_source("train")[0])
    summary = tokenize_dataset(fake, tmp_path, "tiny", None, tokenizer, 10, 4)
    assert summary.skipped == {"too_short": 1, "non_finite_audio": 1}
    assert summary.records["train"] == 1 and summary.prepare_skipped is None
    line = summary.line()
    assert "skipped 2 (prepare: not recorded; tokenize: non_finite_audio 1, too_short 1)" in line
    assert f"bad records: {tmp_path / 'bad_records.jsonl'};" in line
    rows = [json.loads(r) for r in (tmp_path / "bad_records.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["path"], r["reason"]) for r in rows] == [
        ("tokenize", "short.wav", "too_short"),
        ("tokenize", "nan.wav", "non_finite_audio"),
    ]


def _bad_mono_corpus(good: Path, src: Path) -> list[str]:
    """Two of `good`'s records plus a NaN WAV, a non-audio WAV (both dropped by prepare) and
    a 10 ms WAV (prepared, then too short to tokenize); returns the good manifest paths."""
    entries = [json.loads(line) for line in (good / "manifest.jsonl").read_text().splitlines()]
    (src / "wav").mkdir(parents=True)
    lines = []
    for entry in entries[:2]:
        for suffix in (".wav", ".json"):
            shutil.copy(good / Path(entry["path"]).with_suffix(suffix), src / "wav")
        lines.append(json.dumps(entry))
    wav, rate = sf.read(good / entries[2]["path"], dtype="float32")
    wav[rate // 10 :: 997] = np.nan  # float WAVs keep NaN samples
    sf.write(src / "nan.wav", wav, rate, subtype="FLOAT")
    (src / "garbage.wav").write_bytes(b"not a wav file" * 20)
    sf.write(src / "short.wav", np.zeros(rate // 100, np.float32), rate)
    align = (good / entries[2]["path"]).with_suffix(".json").read_text()
    (src / "nan.json").write_text(align)
    (src / "garbage.json").write_text(align)
    (src / "short.json").write_text(json.dumps({"alignments": [["hi", [0.0, 0.01], "S"]]}))
    lines += [
        json.dumps({"path": "nan.wav", "duration": entries[2]["duration"]}),
        json.dumps({"path": "garbage.wav", "duration": 1.0}),
        json.dumps({"path": "short.wav", "duration": 0.01}),
    ]
    (src / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return [e["path"] for e in entries[:2]]


def test_skips_of_both_stages_are_reported(
    corpora: dict[str, Path], tokenizer: Path, tmp_path: Path
) -> None:
    good = _bad_mono_corpus(corpora["mono"], tmp_path / "src")
    out = tmp_path / "tokens"
    summary = tokenize_dataset(tmp_path / "src", out, "tiny", None, tokenizer, 100, 8)
    assert summary.prepare_skipped == {"non_finite_audio": 1, "unreadable_audio": 1}
    assert summary.skipped == {"too_short": 1} and summary.skipped_total == 3
    assert sorted(_all_records(out)) == sorted(good) and summary.records.total() == 2
    prepare_file = next((out / "tfds").rglob("bad_records.json"))
    assert "nan.wav" in json.loads(prepare_file.read_text())["first"]["non_finite_audio"]
    line = summary.line()
    skipped = "prepare: non_finite_audio 1, unreadable_audio 1; tokenize: too_short 1"
    assert f"skipped 3 ({skipped})" in line
    assert f"bad records: {prepare_file}, {out / 'bad_records.jsonl'};" in line


def test_cli_from_prepared_dir(
    builders: list[Any], corpora: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SFM_COMPILE_CACHE", "off")
    prefix, out = tmp_path / "spm", tmp_path / "tokens"
    args = ["data", "train-tokenizer", "--corpus", str(corpora["dia"]), "--out", str(prefix)]
    assert main([*args, "--vocab", "100"]) == 0
    data_dir = Path(builders[0].data_dir).parent.parent  # holds both prepared builders
    args = ["data", "tokenize", "--data", str(data_dir), "--out", str(out)]
    assert main([*args, "--tokenizer", f"{prefix}.model", "--shard-size", "50"]) == 0
    channels = {r["codes"].shape[0] for r in _all_records(out).values()}
    assert channels == {1, 2}
    assert (
        main(
            [
                "data",
                "tokenize",
                "--data",
                str(tmp_path),
                "--out",
                str(out),
                "--tokenizer",
                f"{prefix}.model",
            ]
        )
        == 2
    )


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small tokenizer trained on generated sentences (no corpus needed)."""
    return train_tokenizer(sentences(300, 0), tmp_path_factory.mktemp("ttok") / "spm", 150)


def _text_shards(out: Path) -> list[np.ndarray]:
    """Every sequence of every text shard, in shard order."""
    seqs = []
    for path in sorted(out.glob("text-*.array_record")):
        reader = ArrayRecordReader(str(path))
        seqs += [read_text_record(r) for r in reader.read_all()]
        reader.close()
    return seqs


def test_pack_lines_keeps_lines_whole() -> None:
    lines = [[1] * 3, [2] * 4, [3] * 11, [4] * 2, [5] * 5]
    packed = [p.tolist() for p in pack_lines(lines, 8)]
    assert packed == [[1] * 3 + [2] * 4, [3] * 8, [3] * 3 + [4] * 2, [5] * 5]


def test_tokenize_text_shards(text_tokenizer: Path, tmp_path: Path) -> None:
    lines = sentences(40, 1)
    lines[3:3] = ["", "   "]
    lines.append(" ".join(sentences(12, 2)))  # longer than one sequence: cut
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "text"
    summary = tokenize_text(tmp_path / "in.txt", out, text_tokenizer, 32, 4)
    assert summary.lines == len(lines) and summary.empty_lines == 2
    seqs = _text_shards(out)
    assert len(seqs) == summary.sequences and summary.shards_written == -(-len(seqs) // 4)
    assert all(s.dtype == np.int32 and 0 < len(s) <= 32 for s in seqs)
    sp = load_tokenizer(text_tokenizer)
    want = [i for line in lines for i in sp.encode(line) if i not in (TEXT_EPAD, TEXT_PAD)]
    np.testing.assert_array_equal(np.concatenate(seqs), want)
    assert summary.tokens == len(want) and "2 empty" in summary.line()


def test_tokenize_text_resumes(text_tokenizer: Path, tmp_path: Path) -> None:
    lines = sentences(60, 3)
    first = tokenize_text(lines, tmp_path, text_tokenizer, 20, 8)
    shards = sorted(tmp_path.glob("text-*.array_record"))
    assert first.shards_written == len(shards) >= 3
    before = {p.name: p.read_bytes() for p in shards}
    shards[1].unlink()
    again = tokenize_text(lines, tmp_path, text_tokenizer, 20, 8)
    assert again.shards_written == 1 and again.shards_done_before == len(shards) - 1
    assert {p.name: p.read_bytes() for p in tmp_path.glob("text-*")} == before
