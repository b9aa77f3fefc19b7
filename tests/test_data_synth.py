"""Speech synthesis with word timings, checked against the audio, and the corpus writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sfm.data.synth import SynthError, Utterance, Voice, synthesize, voices
from sfm.data.synth_corpus import synth_corpus
from sfm.data.text import sentences

RATE = 24000
VOICES = {
    "espeak": [Voice("espeak", "en-us", "m3"), Voice("espeak", "en-gb-scotland", "f2", 150, 70)],
    "flite": [Voice("flite", "slt"), Voice("flite", "rms", 200, 40)],
}


def _speech_to_gap_ratio(utt: Utterance) -> float:
    """Mean power inside word spans over mean power outside them."""
    inside = np.zeros(len(utt.audio), bool)
    for w in utt.words:
        inside[int(w.start * RATE) : int(w.end * RATE)] = True
    power = utt.audio.astype(np.float64) ** 2
    return float(power[inside].mean() / max(power[~inside].mean(), 1e-12))


def _check_timings(utt: Utterance) -> None:
    """Words sorted, non-overlapping, non-empty and inside the audio."""
    duration = len(utt.audio) / RATE
    assert utt.words
    for w in utt.words:
        assert 0.0 <= w.start < w.end <= duration + 1e-6
    for a, b in zip(utt.words, utt.words[1:]):
        assert a.end <= b.start + 1e-9


@pytest.mark.parametrize("engine", ["espeak", "flite"])
def test_voices_listed(engine: str) -> None:
    listed = voices(engine)
    assert listed and all(v.engine == engine for v in listed)
    if engine == "espeak":
        assert len({v.name for v in listed}) >= 6 and len(listed) > 100


@pytest.mark.parametrize("engine", ["espeak", "flite"])
def test_word_timings_match_the_audio(engine: str) -> None:
    for voice, text in zip(VOICES[engine] * 2, sentences(4, seed=11)):
        utt = synthesize(text, voice, RATE)
        assert utt.audio.dtype == np.float32 and utt.audio.ndim == 1
        _check_timings(utt)
        spoken = [w.word.lower() for w in utt.words]
        assert spoken == [t.strip(".,?!").lower() for t in text.split()]
        assert _speech_to_gap_ratio(utt) > 5, (text, voice)


def test_flite_same_text_and_voice_same_audio() -> None:
    """flite synthesis is a function of text and voice (its clustergen voices draw noise
    excitation from libc's rand(), reseeded per utterance), whatever was spoken before.
    (espeak-ng's durations still vary by a few ms from call to call.)"""
    for voice in voices("flite"):
        first = synthesize("The answer is seven and that is all.", voice).audio
        synthesize("Something else entirely, with other sounds.", voice)
        again = synthesize("The answer is seven and that is all.", voice).audio
        np.testing.assert_array_equal(first, again, err_msg=voice.name)


def test_sample_rate_and_numbers() -> None:
    utt16 = synthesize("The 12 cats sat.", Voice("flite", "slt"), 16000)
    utt24 = synthesize("The 12 cats sat.", Voice("flite", "slt"), 24000)
    assert abs(len(utt24.audio) / 24000 - len(utt16.audio) / 16000) < 1e-3
    assert [w.word for w in utt24.words] == ["The", "12", "cats", "sat"]


def test_bad_inputs() -> None:
    with pytest.raises(SynthError, match="unknown voice"):
        synthesize("hello", Voice("espeak", "xx-nowhere"))
    with pytest.raises(SynthError, match="engine"):
        synthesize("hello", Voice("festival", "kal"))
    with pytest.raises(SynthError, match="empty"):
        synthesize("  ", Voice("flite", "slt"))


def test_synth_corpus_writes_consistent_files(tmp_path: Path) -> None:
    summary = synth_corpus(tmp_path, minutes=20 / 60, engine="both", seed=5)
    rows = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == summary.files and summary.audio_s >= 20
    for row in rows:
        info = sf.info(str(tmp_path / row["path"]))
        assert info.samplerate == RATE and info.channels == 1 and info.subtype == "PCM_16"
        assert abs(info.frames / RATE - row["duration"]) < 1e-3
        words = json.loads((tmp_path / row["path"]).with_suffix(".json").read_text())
        for word, (start, end), speaker in words["alignments"]:
            assert isinstance(word, str) and speaker == "SPEAKER_MAIN"
            assert 0 <= start < end <= row["duration"] + 1e-3


def test_synth_corpus_is_reproducible(tmp_path: Path) -> None:
    a = synth_corpus(tmp_path / "a", minutes=0.1, engine="espeak", seed=2)
    b = synth_corpus(tmp_path / "b", minutes=0.1, engine="espeak", seed=2)
    assert a.files == b.files
    assert (a.out_dir / "manifest.jsonl").read_text() == (b.out_dir / "manifest.jsonl").read_text()


def test_synth_corpus_bad_text_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SynthError, match="empty.txt"):
        synth_corpus(tmp_path / "out", minutes=0.1, text_file=str(empty))
