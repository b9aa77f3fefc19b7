"""TFDS speech builders on tiny written corpora, a broken corpus, LibriSpeech conversion."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from sfm.data.corpus import REASONS, SAMPLE_RATE, BadRecords, CorpusError
from sfm.data.librispeech import convert_librispeech
from sfm.data.tfds_speech import example_features, main, prepare

RATE = SAMPLE_RATE


def _pcm(seconds: float, channels: int, seed: int) -> np.ndarray:
    """A tone plus noise per channel as int16 [T, C]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    cols = [0.3 * np.sin(2 * np.pi * (200 + 150 * c + 10 * seed) * t) for c in range(channels)]
    wav = np.stack(cols, axis=1) + 0.05 * rng.standard_normal((t.size, channels))
    return np.round(wav * 32767).astype(np.int16)


def _words(seconds: float, n: int, speakers: tuple[str, ...]) -> list[list[Any]]:
    """n sorted made-up words spread over the audio."""
    step = seconds / (n + 1)
    return [
        [f"w{i}", [round(step * (i + 0.5), 3), round(step * (i + 1.2), 3)], speakers[i % 2]]
        for i in range(n)
    ]


def _write(src: Path, name: str, pcm: np.ndarray, align: object, rate: int = RATE) -> str:
    """Write a WAV and (unless align is None) its alignments JSON; returns the manifest line."""
    sf.write(src / f"{name}.wav", pcm, rate, subtype="PCM_16")
    if align is not None:
        text = align if isinstance(align, str) else json.dumps({"alignments": align})
        (src / f"{name}.json").write_text(text)
    return json.dumps({"path": f"{name}.wav", "duration": pcm.shape[0] / rate})


def _manifest(src: Path, lines: list[str]) -> None:
    (src / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def _corpus(tmp: Path, n: int, channels: int) -> dict[str, tuple[np.ndarray, list[list[Any]]]]:
    """Write n good recordings; returns {manifest path: (pcm, alignments)}."""
    tmp.mkdir()
    written, lines = {}, []
    for i in range(n):
        seconds = 0.6 + 0.2 * i
        pcm = _pcm(seconds, channels, seed=i)
        speakers = ("SPEAKER_MAIN", "SPEAKER_MAIN") if channels == 1 else ("MAIN", "OTHER")
        align = _words(seconds, 2 + i, speakers)
        lines.append(_write(tmp, f"rec{i}", pcm, align))
        written[f"rec{i}.wav"] = (pcm, align)
    _manifest(tmp, lines)
    return written


def _read_all(builder: Any) -> dict[str, dict[str, Any]]:
    """Every stored example of every split, by path."""
    out = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split)
        for i in range(len(source)):
            out[source[i]["path"].decode()] = source[i]
    return out


@pytest.mark.parametrize("channels", [1, 2])
def test_round_trip(tmp_path: Path, channels: int) -> None:
    written = _corpus(tmp_path / "src", 6 if channels == 1 else 3, channels)
    builder, bad = prepare(tmp_path / "src", tmp_path / "data", stereo=channels == 2)
    assert not bad
    assert set(builder.info.splits) == {"train", "validation"}
    assert len(builder.as_data_source("validation")) >= 1
    stored = _read_all(builder)
    assert set(stored) == set(written)
    for key, (pcm, align) in written.items():
        ex = stored[key]
        np.testing.assert_array_equal(ex["audio"], pcm)
        assert ex["audio"].dtype == np.int16 and ex["sample_rate"] == RATE
        assert ex["duration"] == pytest.approx(pcm.shape[0] / RATE)
        words = ex["words"]
        assert [w.decode() for w in words["word"]] == [a[0] for a in align]
        assert [s.decode() for s in words["speaker"]] == [a[2] for a in align]
        np.testing.assert_allclose(words["start"], [a[1][0] for a in align], atol=1e-6)
        np.testing.assert_allclose(words["end"], [a[1][1] for a in align], atol=1e-6)
    # Preparing again reuses the data and the summary; the split is stable.
    again, bad_again = prepare(tmp_path / "src", tmp_path / "data", stereo=channels == 2)
    assert bad_again == bad
    assert _read_all(again).keys() == stored.keys()


def _broken_corpus(src: Path) -> tuple[int, dict[str, int]]:
    """One recording per bad-record reason plus 2 good ones; returns (lines, expected counts)."""
    src.mkdir()
    ok = _words(1.0, 3, ("S", "S"))
    pcm = _pcm(1.0, 1, seed=0)
    lines = [_write(src, "good_a", pcm, ok), _write(src, "good_b", _pcm(0.8, 1, 1), ok[:2])]
    lines += ["{not json", json.dumps({"path": "good_a.wav"})]  # 2 bad manifest lines
    lines.append(lines[0])  # duplicate_path
    lines.append(json.dumps({"path": "missing_audio.wav", "duration": 1.0}))
    (src / "unreadable_audio.wav").write_bytes(b"this is not a wav file at all" * 10)
    (src / "unreadable_audio.json").write_text(json.dumps({"alignments": ok}))
    lines.append(json.dumps({"path": "unreadable_audio.wav", "duration": 1.0}))
    lines.append(_write(src, "truncated_audio", pcm, ok))
    whole = (src / "truncated_audio.wav").read_bytes()
    (src / "truncated_audio.wav").write_bytes(whole[: len(whole) // 2])
    lines.append(_write(src, "wrong_sample_rate", _pcm(1.0, 1, 2)[:16000], ok, rate=16000))
    lines.append(_write(src, "channel_mismatch", _pcm(1.0, 2, 3), ok))
    line = json.loads(_write(src, "duration_mismatch", pcm, ok))
    lines.append(json.dumps({**line, "duration": 1.5}))
    lines.append(_write(src, "missing_alignments", pcm, None))
    lines.append(_write(src, "invalid_alignments_json", pcm, '{"alignments": [["w", [0.1'))
    lines.append(_write(src, "bad_alignments_shape", pcm, [["w", 0.1, "S"]]))
    lines.append(_write(src, "no_words", pcm, []))
    lines.append(_write(src, "word_end_before_start", pcm, [["w", [0.5, 0.2], "S"]]))
    lines.append(_write(src, "word_outside_audio", pcm, [["w", [0.5, 1.6], "S"]]))
    unsorted = [["a", [0.5, 0.6], "S"], ["b", [0.1, 0.2], "S"]]
    lines.append(_write(src, "words_unsorted", pcm, unsorted))
    nan = np.full(RATE, np.nan, dtype=np.float32)  # a float WAV keeps its NaN samples
    sf.write(src / "non_finite_audio.wav", nan, RATE, subtype="FLOAT")
    (src / "non_finite_audio.json").write_text(json.dumps({"alignments": ok}))
    lines.append(json.dumps({"path": "non_finite_audio.wav", "duration": 1.0}))
    lines.append(_write(src, "empty_audio", pcm[:0], ok))  # empty audio counts as unreadable
    _manifest(src, lines)
    expected = {r: 1 for r in REASONS if r != "bad_example"}
    expected["bad_manifest_line"] = 2
    expected["unreadable_audio"] = 2
    return len(lines), expected


def test_broken_corpus_counts_every_record(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    n_lines, expected = _broken_corpus(tmp_path / "src")
    builder, bad = prepare(tmp_path / "src", tmp_path / "data")
    good = sum(len(builder.as_data_source(s)) for s in builder.info.splits)
    assert good == 2
    assert good + bad.total() == n_lines
    assert dict(bad) == expected
    for reason, detail in bad.first.items():  # each reason was charged to its own file
        if reason not in ("bad_manifest_line", "duplicate_path"):
            assert reason in detail, (reason, detail)
    table = str(bad)
    assert all(reason in table for reason in expected)
    assert len(table.splitlines()) == 1 + len(expected)
    saved = json.loads(next((tmp_path / "data").rglob("bad_records.json")).read_text())
    assert BadRecords.from_json(saved) == bad
    assert main([str(tmp_path / "src"), str(tmp_path / "data")]) == 0
    assert "words_unsorted" in capsys.readouterr().out


def test_non_finite_dialogue_is_skipped(tmp_path: Path) -> None:
    written = _corpus(tmp_path / "src", 2, channels=2)
    bad_pcm = _pcm(0.8, 2, seed=9).astype(np.float32) / 32768.0
    bad_pcm[500, 1] = np.inf  # one sample of the user channel only
    bad_pcm[900, 0] = np.nan
    sf.write(tmp_path / "src" / "inf.wav", bad_pcm, RATE, subtype="FLOAT")
    (tmp_path / "src" / "inf.json").write_text(json.dumps({"alignments": _words(0.8, 2, "AB")}))
    line = json.dumps({"path": "inf.wav", "duration": 0.8})
    with (tmp_path / "src" / "manifest.jsonl").open("a") as f:
        f.write(line + "\n")
    builder, bad = prepare(tmp_path / "src", tmp_path / "data", stereo=True)
    assert dict(bad) == {"non_finite_audio": 1}
    assert "inf.wav" in bad.first["non_finite_audio"]
    assert "NaN or Inf" in str(bad)
    assert set(_read_all(builder)) == set(written)  # the good records are all kept


def test_all_bad_corpus_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    _manifest(tmp_path / "src", ["{not json"])
    with pytest.raises(CorpusError, match="no usable records"):
        prepare(tmp_path / "src", tmp_path / "data")
    assert main([str(tmp_path / "src"), str(tmp_path / "data2")]) == 1
    with pytest.raises(CorpusError, match="no such manifest"):
        prepare(tmp_path / "nowhere", tmp_path / "data3")


def _librispeech_fixture() -> list[dict[str, Any]]:
    """Two LibriSpeech-shaped examples (16 kHz int16 speech) plus one with empty text."""
    t = np.arange(16000) / 16000
    tone = np.round(0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    return [
        {"speech": tone, "text": b"HELLO THERE WORLD", "speaker_id": 19, "id": b"19-198-0001"},
        {"speech": tone[:8000], "text": "GOOD DAY", "speaker_id": 26, "id": "26-495-0002"},
        {"speech": tone, "text": b"  ", "speaker_id": 19, "id": b"19-198-0003"},
    ]


def test_librispeech_conversion() -> None:
    bad = BadRecords()
    out = list(convert_librispeech(_librispeech_fixture(), bad=bad))
    assert dict(bad) == {"no_words": 1}
    assert [ex["path"] for ex in out] == ["19-198-0001", "26-495-0002"]
    first = out[0]
    assert first["audio"].shape == (24000, 1) and first["audio"].dtype == np.int16
    assert first["sample_rate"] == RATE and first["duration"] == pytest.approx(1.0)
    spectrum = np.abs(np.fft.rfft(first["audio"][:, 0].astype(np.float64)))
    assert np.argmax(spectrum) * RATE / 24000 == pytest.approx(440, abs=2)
    assert first["words"]["word"] == ["HELLO", "THERE", "WORLD"]
    assert all(math.isnan(s) for s in first["words"]["start"])
    assert first["words"]["speaker"] == ["librispeech_19"] * 3
    assert out[1]["audio"].shape == (12000, 1)
    example_features(1).encode_example(first)  # same layout as SpeechUtterances stores


def test_librispeech_alignments() -> None:
    timed = {"19-198-0001": [("HELLO", 0.1, 0.3), ("THERE", 0.3, 0.5), ("WORLD", 0.6, 0.9)]}
    bad = BadRecords()
    out = list(convert_librispeech(_librispeech_fixture()[:2], alignments=timed, bad=bad))
    assert len(out) == 1 and dict(bad) == {"missing_alignments": 1}
    np.testing.assert_allclose(out[0]["words"]["start"], [0.1, 0.3, 0.6])
