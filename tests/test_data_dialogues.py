"""Synthetic dialogues: stereo layout, word spans and each turn-taking event, checked on audio."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import soundfile as sf

from sfm.data.dialogues import (
    ASSISTANT,
    HEARD_DB,
    SAMPLE_RATE,
    USER,
    EventShares,
    Timeline,
    _voices,
    render_dialogue,
    synth_dialogues,
    trimmed,
)
from sfm.data.synth import SynthError, Voice, frame_db, synthesize, voices

SEEDS = range(8)
EPS = 1e-6


@pytest.fixture(scope="module")
def dialogues() -> list[Timeline]:
    assistant, user = _voices(random.Random(0))
    return [render_dialogue(seed, assistant, user, exchanges=3) for seed in SEEDS]


def _peak(track: np.ndarray, start: float, end: float) -> float:
    a, b = int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)
    return float(np.abs(track[a:b]).max()) if b > a else 0.0


def test_every_event_kind_occurs(dialogues: list[Timeline]) -> None:
    kinds = {e.kind for tl in dialogues for e in tl.events}
    assert kinds == {"turn_end", "pause", "backchannel", "interruption"}


def test_words_lie_on_their_speakers_channel(dialogues: list[Timeline]) -> None:
    for tl in dialogues:
        audio = tl.stereo()
        assert audio.shape[1] == 2 and audio.dtype == np.float32
        for word, start, end, speaker in tl.words:
            assert 0 <= start < end <= audio.shape[0] / SAMPLE_RATE, word
            channel = audio[:, 0] if speaker == ASSISTANT else audio[:, 1]
            assert _peak(channel, start, end) > 1e-3, (word, speaker)


def test_assistant_stays_silent_through_user_pauses(dialogues: list[Timeline]) -> None:
    pauses = [(tl, e) for tl in dialogues for e in tl.events if e.kind == "pause"]
    assert pauses
    for tl, e in pauses:
        assert e.end - e.start >= 0.6
        assert _peak(tl.stereo()[:, 0], e.start, e.end) == 0.0
        assert _peak(tl.stereo()[:, 1], e.start + 0.05, e.end - 0.05) < 1e-3


def test_assistant_stops_after_an_interruption(dialogues: list[Timeline]) -> None:
    cuts = [(tl, e) for tl in dialogues for e in tl.events if e.kind == "interruption"]
    assert cuts
    for tl, e in cuts:
        left, right = tl.stereo()[:, 0], tl.stereo()[:, 1]
        assert e.assistant_stop is not None and e.start < e.assistant_stop < e.end
        assert _peak(left, e.start - 0.3, e.start) > 1e-3, "the assistant was speaking"
        # Silent from the cut until the reply, which may start up to 0.15 s before the end.
        assert _peak(left, e.assistant_stop + 0.001, e.end - 0.15) == 0.0, "and stopped"
        assert _peak(right, e.start, e.end) > 1e-3
        reply = e.end - 0.15 - 1e-6  # the reply's words may overlap the question's end
        late = [w for w, s, _, spk in tl.words if spk == ASSISTANT and e.assistant_stop < s < reply]
        assert not late


def test_backchannels_are_short(dialogues: list[Timeline]) -> None:
    bcs = [(tl, e) for tl in dialogues for e in tl.events if e.kind == "backchannel"]
    assert bcs
    for tl, e in bcs:
        assert e.end - e.start < 1.0
        words = [w for w, s, _, spk in tl.words if spk == USER and e.start <= s < e.end]
        assert 1 <= len(words) <= 2
        assert _peak(tl.stereo()[:, 0], e.start, e.end) > 1e-3, "said while the assistant talks"


@pytest.mark.parametrize("voice", voices("flite"), ids=lambda v: v.name)
def test_trimmed_drops_the_padding_and_nothing_heard(voice: Voice) -> None:
    """flite pads both ends with quiet noise that a codec hears; `trimmed` drops it and
    nothing as loud as speech, fades its new edges, and moves every timing by the cut."""
    utt = synthesize("What is the capital of France? Cats sleep.", voice, SAMPLE_RATE)
    cut = trimmed(utt, margin_s=0.01)
    start = round((utt.words[1].start - cut.words[1].start) * SAMPLE_RATE)
    stop = start + len(cut.audio)
    assert start > 0.05 * SAMPLE_RATE, "flite's leading padding is there to cut"
    fade = int(0.005 * SAMPLE_RATE)
    np.testing.assert_array_equal(cut.audio[fade:-fade], utt.audio[start + fade : stop - fade])
    assert cut.audio[0] == cut.audio[-1] == 0.0
    hop = len(utt.audio) // len(frame_db(utt.audio, SAMPLE_RATE))
    frame_at = np.arange(len(frame_db(utt.audio, SAMPLE_RATE))) * hop
    dropped = (frame_at + hop <= start) | (frame_at >= stop)
    dropped &= frame_at >= 0.08 * SAMPLE_RATE  # kal16 clicks in its first 60 ms: dropped too
    assert frame_db(utt.audio, SAMPLE_RATE)[dropped].max() <= HEARD_DB
    shift = start / SAMPLE_RATE
    for a, b in zip(utt.words[1:-1], cut.words[1:-1], strict=True):
        assert b.word == a.word
        assert (b.start, b.end) == pytest.approx((a.start - shift, a.end - shift))
    assert cut.words[0].start == pytest.approx(0.01, abs=2 / SAMPLE_RATE)
    assert cut.words[-1].end == pytest.approx(len(cut.audio) / SAMPLE_RATE - 0.01, abs=2e-3)


def test_replies_start_when_the_turn_end_says(dialogues: list[Timeline]) -> None:
    """The question is heard up to the turn end and the reply from the event's reply time:
    no padding of the speech engines moves either (flite pads ~0.2 s of quiet noise)."""
    for tl in dialogues:
        left = tl.stereo()[:, 0]
        for e in (e for e in tl.events if e.kind == "turn_end"):
            assert -0.15 <= e.end - e.start <= 0.7
            first = min(s for _, s, _, spk in tl.words if spk == ASSISTANT and s >= e.end - 1e-6)
            assert first - e.end <= 0.011
            last = max(x for _, _, x, spk in tl.words if spk == USER and x <= e.start + 1e-6)
            assert e.start - last <= 0.011
            if e.end > e.start + 0.05:  # nothing on the assistant's channel before its reply
                assert _peak(left, e.start + 0.01, e.end - 0.001) == 0.0


def test_replies_are_sentences(dialogues: list[Timeline]) -> None:
    """Every reply the user does not cut short has more than 3 words: a bare "Yes." goes on
    with a remark (Full-Duplex-Bench counts a one-word reply as not taking the turn)."""
    replies = 0
    for tl in dialogues:
        ends = sorted(e.end for e in tl.events if e.kind == "turn_end")
        cuts = [e.assistant_stop for e in tl.events if e.kind == "interruption"]
        for start, until in zip(ends, [*ends[1:], float("inf")]):
            if any(start < c < until for c in cuts):
                continue
            said = [w for w, s, _, who in tl.words if who == ASSISTANT and start - EPS <= s < until]
            assert len(said) >= 4, said
            replies += 1
    assert replies >= 10


def test_corpus_files(tmp_path) -> None:
    summary = synth_dialogues(tmp_path, minutes=0.5, seed=3)
    lines = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == summary.files >= 2 and summary.audio_s >= 30
    for row in lines:
        wav = tmp_path / row["path"]
        info = sf.info(wav)
        assert (info.samplerate, info.channels) == (SAMPLE_RATE, 2)
        assert abs(info.frames / SAMPLE_RATE - row["duration"]) < 1e-3
        rows = json.loads(wav.with_suffix(".json").read_text())["alignments"]
        assert {r[2] for r in rows} == {ASSISTANT, USER}
        assert all(0 <= r[1][0] < r[1][1] <= row["duration"] + 1e-3 for r in rows)
        events = json.loads(wav.with_name(wav.stem + ".events.json").read_text())["events"]
        assert any(ev["kind"] == "turn_end" for ev in events)


@pytest.mark.parametrize(
    ("shares", "present", "absent"),
    [
        (EventShares(0.0, 0.0), set(), {"interruption", "backchannel"}),
        (EventShares(1.0, 0.0), {"interruption"}, set()),
        (EventShares(0.0, 1.0), {"backchannel"}, {"interruption"}),
    ],
)
def test_event_shares_choose_what_meets_a_reply(
    shares: EventShares, present: set[str], absent: set[str]
) -> None:
    """Neither, every reply over 2 s interrupted (a reply of 1.5-2 s, too short for that,
    may still be backchannelled), or every reply backchannelled and none interrupted."""
    assistant, user = _voices(random.Random(0))
    kinds = [
        e.kind
        for seed in range(3)
        for e in render_dialogue(seed, assistant, user, exchanges=3, shares=shares).events
    ]
    assert present <= set(kinds) and not absent & set(kinds), kinds


@pytest.mark.parametrize(
    ("given", "field"),
    [({"interrupted": -0.1}, "interrupted"), ({"backchannelled": 1.5}, "backchannelled"),
     ({"interrupted": 0.6, "backchannelled": 0.6}, "interrupted + backchannelled")],
)  # fmt: skip
def test_bad_event_shares_name_the_field(given: dict[str, float], field: str) -> None:
    with pytest.raises(SynthError, match=f"^{re.escape(field)}: "):
        EventShares(**given)
