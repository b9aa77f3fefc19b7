"""Turn-taking metrics on hand-built conversations whose answers are known.

One synthetic dialogue (all four event kinds) supplies the user's side; the model's channel
is built by hand to follow a policy: speak inside every pause, stay silent, answer 0.4 s after
every turn end, stop 0.3 s after every barge-in. First on exact speech timelines (the metric
definitions), then as audio through the VAD and the ASR (`sfm eval duplex --scored`)."""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from sfm.data.audio import save_audio
from sfm.data.dialogues import ASSISTANT, SAMPLE_RATE, USER, Timeline, _voices, render_dialogue
from sfm.data.synth import synthesize, voices
from sfm.eval.speech import Speech, Word
from sfm.eval.turn_taking import (
    aggregate,
    floor,
    js_distance,
    score_dialogue,
    takes_turn,
)

SEED = 1  # a dialogue with pauses, turn ends, interruptions and a backchannel
LATENCY_TOL_S = 0.1  # ASR word starts and VAD ends are 10-30 ms frames, plus the voice's onset


@pytest.fixture(scope="module")
def dialogue() -> Timeline:
    assistant, user = _voices(random.Random(SEED))
    tl = render_dialogue(SEED, assistant, user, exchanges=4)
    kinds = {e.kind for e in tl.events}
    assert kinds == {"pause", "turn_end", "interruption", "backchannel"}, kinds
    return tl


def _user_words(tl: Timeline) -> list[Word]:
    return [Word(w, s, e) for w, s, e, spk in tl.words if spk == USER]


def _said(start: float, seconds: float, words: int) -> Speech:
    """Exact speech: one voice segment of `seconds` from `start` holding `words` words."""
    step = seconds / words
    return Speech(
        ((start, start + seconds),),
        tuple(Word(f"w{i}", start + i * step, start + (i + 1) * step) for i in range(words)),
    )


def _merge(*parts: Speech) -> Speech:
    segments = sorted(s for p in parts for s in p.segments)
    return Speech(tuple(segments), tuple(sorted((w for p in parts for w in p.words),
                                                key=lambda w: w.start)))  # fmt: skip


def _events(tl: Timeline, kind: str) -> list:
    return [e for e in tl.events if e.kind == kind]


def _metrics(tl: Timeline, model: Speech) -> dict:
    speaker = [Word(w, s, e) for w, s, e, spk in tl.words if spk == ASSISTANT]
    return aggregate([score_dialogue("d", tl.events, model, _user_words(tl), speaker)])


def test_takes_turn_thresholds():
    assert takes_turn(_said(0.0, 1.0, 1), 0.0, 5.0)  # 1 s of speech
    assert takes_turn(_said(0.0, 0.5, 4), 0.0, 5.0)  # more than 3 words
    assert not takes_turn(_said(0.0, 0.9, 3), 0.0, 5.0)
    assert not takes_turn(_said(0.0, 2.0, 8), 2.5, 5.0)  # outside the window


def test_speaking_in_every_pause(dialogue):
    model = _merge(*(_said(e.start + 0.1, 2.0, 5) for e in _events(dialogue, "pause")))
    m = _metrics(dialogue, model)
    assert m["pause_handling"] == {"tor": 1.0, "events": 2}


def test_silent_model(dialogue):
    m = _metrics(dialogue, Speech((), ()))
    assert m["pause_handling"]["tor"] == 0.0
    assert m["smooth_turn_taking"]["tor"] == 0.0
    assert m["smooth_turn_taking"]["latency_s"] is None
    assert m["user_interruption"]["tor"] == 0.0
    assert m["user_interruption"]["talking_at_barge_in"] == 0
    assert m["backchannel"]["tor"] == 0.0 and m["backchannel"]["frequency"] == 0.0


def test_answering_after_every_turn_end(dialogue):
    model = _merge(*(_said(e.start + 0.4, 1.5, 5) for e in _events(dialogue, "turn_end")))
    m = _metrics(dialogue, model)
    assert m["smooth_turn_taking"]["tor"] == 1.0
    assert m["smooth_turn_taking"]["latency_s"] == pytest.approx(0.4, abs=1e-9)
    assert m["pause_handling"]["tor"] == 0.0


def test_stopping_after_every_barge_in(dialogue):
    parts = []
    for e in _events(dialogue, "interruption"):
        parts.append(_said(e.start - 1.5, 1.8, 6))  # talking, stops 0.3 s after the barge-in
        parts.append(_said(e.end + 0.5, 1.5, 5))  # then answers the interruption
    m = _metrics(dialogue, _merge(*parts))["user_interruption"]
    assert m["latency_s"] == pytest.approx(0.3, abs=1e-9)
    assert m["stop_rate"] == 1.0 and m["talking_at_barge_in"] == 2
    assert m["tor"] == 1.0 and m["response_latency_s"] == pytest.approx(0.5, abs=1e-9)


def test_backchannels(dialogue):
    stretches = floor(_user_words(dialogue), dialogue.events, USER)
    assert len(stretches) == 4  # the four user turns (pauses bridged), the backchannel apart
    # one short "yeah" inside every user turn: a backchannel, not a turn
    # 45% of the way in: mid-bin, clear of the 0.5 bin edge that rounding could cross
    model = _merge(*(_said(a + 0.45 * (b - a), 0.4, 1) for a, b in stretches))
    m = _metrics(dialogue, model)["backchannel"]
    floor_s = sum(b - a for a, b in stretches)
    assert m["model_backchannels"] == 4 and m["tor"] == 0.0
    assert m["frequency"] == pytest.approx(4 / floor_s)
    # the listener's (user's) one backchannel, placed within the assistant's stretch
    speaker = [Word(w, s, e) for w, s, e, spk in dialogue.words if spk == ASSISTANT]
    (bc,) = _events(dialogue, "backchannel")
    ((a, b),) = [(a, b) for a, b in floor(speaker, dialogue.events, ASSISTANT) if a <= bc.start < b]
    listener = (bc.start - a) / (b - a)
    assert m["jsd"] == pytest.approx(js_distance([0.45] * 4, [listener]))
    assert (m["jsd"] == 0.0) == (int(listener * 10) == 4)  # same bin or a distance


def test_overlapping_reply_and_unanswerable_events(dialogue):
    """A reply starting 0.1 s before the turn end counts from its start; events without 2 s
    of recording after them cannot be answered and are left out, counted."""
    turn_ends = _events(dialogue, "turn_end")
    model = _merge(*(_said(e.start - 0.1, 1.5, 5) for e in turn_ends))
    speaker = [Word(w, s, e) for w, s, e, spk in dialogue.words if spk == ASSISTANT]
    end = turn_ends[-1].start + 1.0  # the recording stops 1 s after the last turn end
    scored = score_dialogue("d", dialogue.events, model, _user_words(dialogue), speaker, end)
    m = aggregate([scored])
    assert m["smooth_turn_taking"]["latency_s"] == pytest.approx(-0.1, abs=1e-9)
    assert m["smooth_turn_taking"]["events"] == len(turn_ends) - 1
    late = [e for e in dialogue.events if e.kind == "interruption" and end - e.end < 2.0]
    assert m["unscored_events"] == 1 + len(late) and scored.row()["unscored"] == 1 + len(late)


def test_js_distance():
    assert js_distance([0.1, 0.5, 0.9], [0.1, 0.5, 0.9]) == pytest.approx(0.0)
    assert js_distance([0.05, 0.05], [0.95]) == pytest.approx(1.0)
    assert js_distance([], [0.5]) is None


# ---------------------------------------------------------------- through the VAD and the ASR


def _write_set(root: Path, tl: Timeline, model_t: np.ndarray, name: str = "d0") -> None:
    (root / "wav").mkdir(parents=True, exist_ok=True)
    user = tl.stereo()[:, 1]
    n = max(len(user), len(model_t))
    stereo = np.zeros((n, 2), np.float32)
    stereo[: len(model_t), 0], stereo[: len(user), 1] = model_t, user
    save_audio(root / "wav" / f"{name}.wav", stereo, SAMPLE_RATE)
    rows = [[w, [s, e], spk] for w, s, e, spk in tl.words]
    (root / "wav" / f"{name}.json").write_text(json.dumps({"alignments": rows}))
    events = {"events": [asdict(e) for e in tl.events]}
    (root / "wav" / f"{name}.events.json").write_text(json.dumps(events))
    with (root / "manifest.jsonl").open("a") as f:
        f.write(json.dumps({"path": f"wav/{name}.wav"}) + "\n")


def _model_channel(tl: Timeline, placements: list[tuple[float, float | None]]) -> np.ndarray:
    """The model's channel: one clear sentence whose first word starts at each `start`,
    cut at `stop` (None: whole)."""
    reply = synthesize("The answer is seven and that is all.", voices("flite")[0])
    track = Timeline()
    lead = reply.words[0].start
    for start, stop in placements:
        track.place(reply, ASSISTANT, start - lead, stop=stop)
    return track.left


@pytest.fixture(scope="module")
def scored(dialogue, tmp_path_factory) -> dict:
    """One set of three conversations, each a policy, scored by `sfm eval duplex --scored`."""
    from sfm.eval.duplex import score_dialogues

    root = tmp_path_factory.mktemp("duplex")
    turn_ends = [(e.start + 0.4, None) for e in _events(dialogue, "turn_end")]
    barge_ins = [(e.start - 1.2, e.start + 0.3) for e in _events(dialogue, "interruption")]
    _write_set(root / "answers", dialogue, _model_channel(dialogue, turn_ends))
    _write_set(root / "stops", dialogue, _model_channel(dialogue, barge_ins))
    _write_set(root / "silent", dialogue, np.zeros(SAMPLE_RATE, np.float32))
    return {k: score_dialogues(root / k, root / f"{k}.out") for k in ("answers", "stops", "silent")}


def test_scored_answers_after_turn_ends(scored):
    m = scored["answers"]
    assert m["smooth_turn_taking"]["tor"] == 1.0
    assert m["smooth_turn_taking"]["latency_s"] == pytest.approx(0.4, abs=LATENCY_TOL_S)
    assert m["pause_handling"]["tor"] == 0.0


def test_scored_stops_after_barge_in(scored):
    m = scored["stops"]["user_interruption"]
    assert m["talking_at_barge_in"] == 2
    assert m["latency_s"] == pytest.approx(0.3, abs=LATENCY_TOL_S)


def test_scored_silent(scored):
    m = scored["silent"]
    assert m["pause_handling"]["tor"] == 0.0 and m["smooth_turn_taking"]["tor"] == 0.0
    assert m["skipped"]["count"] == 0


def test_scored_report_files(scored, tmp_path):
    from sfm.eval.duplex import score_dialogues

    root = tmp_path / "set"
    (root / "wav").mkdir(parents=True)
    (root / "wav" / "bad.wav").write_bytes(b"not audio")
    (root / "wav" / "bad.events.json").write_text(json.dumps({"events": []}))
    (root / "wav" / "noevents.wav").write_bytes(b"")
    (root / "wav" / "null.wav").write_bytes(b"")
    null = {"kind": "pause", "speaker": USER, "start": None, "end": 1.0}
    (root / "wav" / "null.events.json").write_text(json.dumps({"events": [null]}))
    rows = [{"path": "wav/bad.wav"}, {"path": "wav/noevents.wav"}, "not json",
            {"path": "wav/null.wav"}]  # fmt: skip
    (root / "manifest.jsonl").write_text("\n".join(
        r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")  # fmt: skip
    m = score_dialogues(root, tmp_path / "out")
    assert m["skipped"]["count"] == 4
    assert any("null.events.json: malformed events" in r for r in m["skipped"]["reasons"])
    assert any("bad.wav: unreadable audio" in r for r in m["skipped"]["reasons"])
    assert any("noevents.events.json: no events file" in r for r in m["skipped"]["reasons"])
    assert m["smooth_turn_taking"]["tor"] is None  # no dialogue scored: no events
    for name in ("metrics.json", "report.md", "tor.png", "latency.png"):
        assert (tmp_path / "out" / name).is_file(), name


def test_scoring_in_worker_processes(dialogue, tmp_path, monkeypatch):
    """Dialogues scored in two worker processes score exactly as in this one, in order."""
    from sfm.eval import duplex

    turn_ends = [(e.start + 0.4, None) for e in _events(dialogue, "turn_end")]
    barge_ins = [(e.start - 1.2, e.start + 0.3) for e in _events(dialogue, "interruption")]
    _write_set(tmp_path / "set", dialogue, _model_channel(dialogue, turn_ends), "answers")
    _write_set(tmp_path / "set", dialogue, _model_channel(dialogue, barge_ins), "stops")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    two = duplex.score_dialogues(tmp_path / "set", tmp_path / "two")
    monkeypatch.setattr(duplex, "SCORE_WORKERS", 1)
    one = duplex.score_dialogues(tmp_path / "set", tmp_path / "one")
    assert [r["dialogue"] for r in two["dialogues"]] == ["answers", "stops"]
    assert two == one


def test_through_codec(scored, dialogue, tmp_path):
    """The set's assistant channel through a "codec": unchanged, it scores as the set does;
    muted, nothing is answered; the user's channel, events and alignments pass as they are,
    and an unreadable dialogue is skipped and counted."""
    from sfm.eval.duplex import through_codec

    root = tmp_path / "answers"
    turn_ends = [(e.start + 0.4, None) for e in _events(dialogue, "turn_end")]
    _write_set(root, dialogue, _model_channel(dialogue, turn_ends))
    (root / "wav" / "bad.wav").write_bytes(b"not audio")
    (root / "wav" / "bad.events.json").write_text(json.dumps({"events": []}))
    with (root / "manifest.jsonl").open("a") as f:
        f.write(json.dumps({"path": "wav/bad.wav"}) + "\n")
    same = through_codec(lambda x: x, SAMPLE_RATE, root, tmp_path / "same")
    expected = scored["answers"]["smooth_turn_taking"]
    assert same["smooth_turn_taking"] == pytest.approx(expected, abs=1e-9)  # float sums
    assert same["skipped"]["count"] == 1 and "bad.wav" in same["skipped"]["reasons"][0]
    muted = through_codec(np.zeros_like, SAMPLE_RATE, root, tmp_path / "muted")
    assert muted["smooth_turn_taking"]["tor"] == 0.0
    import soundfile as sf

    written = sf.read(tmp_path / "muted" / "dialogues" / "wav" / "d0.wav")[0]
    source = sf.read(root / "wav" / "d0.wav")[0]
    assert not written[:, 0].any()
    np.testing.assert_array_equal(written[:, 1], source[:, 1])
    for name in ("d0.events.json", "d0.json"):
        assert (tmp_path / "muted" / "dialogues" / "wav" / name).is_file(), name


def test_converse_command(dialogue, tmp_path):
    """`sfm eval duplex --config tiny --dialogues DIR`: each user channel through the engine
    (tiny random weights), the conversations written beside their events, then scored."""
    from sfm.cli import main

    held_out = tmp_path / "held_out"
    _write_set(held_out, dialogue, np.zeros(SAMPLE_RATE, np.float32), "d0")
    _write_set(held_out, dialogue, np.zeros(SAMPLE_RATE, np.float32), "d1")
    out = tmp_path / "out"
    argv = ["eval", "duplex", "--config", "tiny", "--dialogues", str(held_out), "--out", str(out)]
    assert main([*argv, "--slots", "2", "--limit", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [r["dialogue"] for r in m["dialogues"]] == ["d0"]  # --limit
    assert m["smooth_turn_taking"]["events"] == 4 and m["engine"]["slots"] == 2
    import soundfile as sf

    stereo, rate = sf.read(out / "conversations" / "wav" / "d0.wav")
    user = sf.read(held_out / "wav" / "d0.wav")[0][:, 1]
    assert rate == SAMPLE_RATE and stereo.shape[1] == 2
    np.testing.assert_allclose(stereo[: len(user), 1], user, atol=1e-4)  # the user as heard
    for name in ("d0.events.json", "d0.json", "d0.text.json"):
        assert (out / "conversations" / "wav" / name).is_file(), name


def test_converse_many_shares_slots():
    """Three users of different lengths on two slots: the third joins when a slot frees, each
    conversation keeps its own frames, and every slot is free afterwards."""
    from sfm.infer.converse import converse_many, load_models
    from sfm.infer.engine import Engine

    codec, lm, _ = load_models(config="tiny")
    engine = Engine(codec, lm, 2)
    n = engine.frame_size
    rng = np.random.default_rng(0)
    users = [0.1 * rng.standard_normal(k * n - 7).astype(np.float32) for k in (5, 2, 4)]
    done = []
    talks = converse_many(engine, users, progress=done.append)
    assert done == [1, 1, 1] and not engine.busy.any()
    assert [t.frames for t in talks] == [5, 2, 4]
    for user, talk in zip(users, talks):
        assert talk.stereo_tc.shape == (talk.frames * n, 2)
        np.testing.assert_array_equal(talk.stereo_tc[: len(user), 1], user)
        assert all(0 <= t < talk.frames * n / engine.sample_rate for t, _, _ in talk.text)
    with pytest.raises(ValueError, match="conversation 1: the user's audio is empty"):
        converse_many(engine, [users[0], np.zeros(0, np.float32)])
    assert not engine.busy.any()


def test_duplex_table_rates_carry_their_standard_error():
    """A rate of 9 events in 12 reads 0.750 ± 0.125 (sqrt(0.75 * 0.25 / 12)), its count in the
    events column; a rate over no events stays bare, and latencies carry no error."""
    from sfm.eval.report import duplex_table, rate_cell

    metrics = {
        "pause_handling": {"tor": 0.75, "events": 12},
        "smooth_turn_taking": {"tor": None, "latency_s": 0.5, "events": 0},
        "user_interruption": {"tor": 1.0, "stop_rate": 0.5, "talking_at_barge_in": 2, "events": 2},
    }
    assert rate_cell(metrics, "pause_handling.tor") == "0.750 ± 0.125"
    assert rate_cell(metrics, "user_interruption.tor") == "1.000 ± 0.000"
    assert rate_cell(metrics, "user_interruption.stop_rate") == "0.500 ± 0.354"
    assert rate_cell(metrics, "smooth_turn_taking.tor") == "-"
    rows = {line.split(" | ")[0].strip("| "): line for line in duplex_table(metrics)}
    pause = rows["pause handling TOR"]
    assert pause.startswith("| pause handling TOR | lower | 12 | 0.750 ± 0.125 |")
    assert "| turn-taking latency (s) | lower |  | 0.500 |" in rows["turn-taking latency (s)"]
