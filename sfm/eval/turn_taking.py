"""Full-Duplex-Bench v1 turn-taking metrics of a model's channel against a dialogue's events.

A dialogue gives the user's side: its turn-taking events (`sfm.data.dialogues.Event`: the
user's mid-turn pauses, turn ends, interruptions, backchannels) and the user's words. The
model's side is what a VAD and an ASR heard on its channel (`sfm.eval.speech.Speech`).

- **Takes the turn** (the benchmark's TOR = 1): within the window, the model's speech spans
  >= 1 s (first voice onset to last offset) or it says more than 3 words.
- **Pause handling** (lower is better): per user pause, does the model take the turn from
  the pause's start until the user's turn is over (the end of the stretch of the user holding
  the floor that contains the pause)?
- **Smooth turn-taking**: per user turn end, does the model take the turn within 4 s after
  it; latency = its first word's start (its first voice onset if the ASR found no word)
  minus the turn end, over the turns it took; a reply overlapping the end of the user's turn
  by up to 0.5 s counts from its own start (negative latency).
- **User interruption**: per barge-in, TOR = does the model take the turn within 4 s after
  the interruption ends (the benchmark's), with latency from that end; stop latency = how long
  the model kept talking after the barge-in (the end of its run of speech holding the barge-in
  time, runs joined across gaps < 0.25 s), over the barge-ins it was talking at; stop rate =
  the share of those it stopped within 0.5 s.
- **Backchannel**: a model backchannel is a voice segment < 1 s with <= 2 words starting while
  the user holds the floor. TOR = per stretch of the user holding the floor, does the model
  take the turn inside it (lower is better); frequency = model backchannels per second of the
  user holding the floor; JSD = the Jensen-Shannon distance (base 2, in [0, 1]) between where
  in those stretches the model's backchannels fall (10 bins of relative position) and where the
  dialogues' own listener backchannels fall in the speaker's stretches; null when either side
  has none.

The user holds the floor over its words (backchannel words left out) joined across gaps
< 0.5 s and across declared pauses. Windows end with the recording; a turn end or an
interruption followed by less than 2 s of it cannot be answered and is left out (counted
as unscored). Rates pool events over dialogues (each event counts once); a kind absent from
every dialogue gives null. One-word replies ("Paris.") do not take the turn by the
benchmark's rule: scoring a dialogue set's own assistant channel shows the ceiling that sets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from sfm.data.dialogues import ASSISTANT, USER, Event
from sfm.eval.speech import Speech, Word

TURN_SPAN_S = 1.0
TURN_WORDS = 3  # more than this many words take the turn
BACKCHANNEL_S = 1.0
BACKCHANNEL_WORDS = 2
RESPONSE_WINDOW_S = 4.0
MIN_WINDOW_S = 2.0  # an event with less audio after it than this cannot be answered: unscored
OVERLAP_S = 0.5  # a reply may start this much before the turn end (latency down to -0.5 s)
STOP_GAP_S = 0.25
STOP_WITHIN_S = 0.5
FLOOR_GAP_S = 0.5
JSD_BINS = 10

Span = tuple[float, float]


def _clipped(speech: Speech, start: float, end: float) -> list[Span]:
    return [(max(a, start), min(b, end)) for a, b in speech.segments if b > start and a < end]


def takes_turn(speech: Speech, start: float, end: float) -> bool:
    """The benchmark's turn taking within [start, end): >= 1 s of speech span or > 3 words."""
    spans = _clipped(speech, start, end)
    span = spans[-1][1] - spans[0][0] if spans else 0.0
    words = sum(start <= w.start < end for w in speech.words)
    return span >= TURN_SPAN_S or words > TURN_WORDS


def onset(speech: Speech, start: float, end: float, lookback: float = 0.0) -> float | None:
    """The first word's start in [start, end), else the first voice onset there; with a
    lookback, speech already running at `start` that began at most that long before it
    counts from its own start."""
    early = [a for a, b in speech.segments if start - lookback <= a < start < b]
    if early:
        return min(early)
    words = [w.start for w in speech.words if start <= w.start < end]
    if words:
        return min(words)
    spans = _clipped(speech, start, end)
    return spans[0][0] if spans else None


def floor(words: Sequence[Word], events: Sequence[Event], speaker: str) -> list[Span]:
    """Stretches of `speaker` holding the floor: its words (minus those inside its own
    backchannels) joined across gaps < 0.5 s and across its declared pauses."""
    own = [e for e in events if e.speaker == speaker]
    backchannels = [(e.start, e.end) for e in own if e.kind == "backchannel"]
    pauses = [(e.start, e.end) for e in own if e.kind == "pause"]
    spans = sorted(
        (w.start, w.end)
        for w in words
        if not any(a - 0.05 <= w.start < b + 0.05 for a, b in backchannels)
    )
    out: list[Span] = []
    for a, b in spans:
        if out:
            gap = (out[-1][1], a)
            bridged = gap[1] - gap[0] < FLOOR_GAP_S or any(
                p0 >= gap[0] - 0.1 and p1 <= gap[1] + 0.1 for p0, p1 in pauses
            )
            if bridged:
                out[-1] = (out[-1][0], max(out[-1][1], b))
                continue
        out.append((a, b))
    return out


def _runs(segments: Sequence[Span]) -> list[Span]:
    runs: list[Span] = []
    for a, b in segments:
        if runs and a - runs[-1][1] < STOP_GAP_S:
            runs[-1] = (runs[-1][0], max(runs[-1][1], b))
        else:
            runs.append((a, b))
    return runs


def _containing(spans: Sequence[Span], t: float) -> Span | None:
    return next(((a, b) for a, b in spans if a <= t < b), None)


@dataclasses.dataclass
class DialogueScore:
    """What one dialogue contributed to each metric (lists: one entry per event)."""

    name: str
    unscored: int = 0  # events too close to the end of the recording to be answered
    pause_taken: list[bool] = dataclasses.field(default_factory=list)
    turn_taken: list[bool] = dataclasses.field(default_factory=list)
    turn_latency_s: list[float] = dataclasses.field(default_factory=list)
    interruption_taken: list[bool] = dataclasses.field(default_factory=list)
    interruption_latency_s: list[float] = dataclasses.field(default_factory=list)
    stop_latency_s: list[float] = dataclasses.field(default_factory=list)
    floor_taken: list[bool] = dataclasses.field(default_factory=list)
    floor_s: float = 0.0
    model_backchannels: list[float] = dataclasses.field(default_factory=list)  # positions
    listener_backchannels: list[float] = dataclasses.field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """The dialogue's own figures (for metrics.json's per-dialogue rows)."""
        return {
            "dialogue": self.name,
            "pauses": len(self.pause_taken),
            "pause_tor": _mean(self.pause_taken),
            "turn_ends": len(self.turn_taken),
            "turn_tor": _mean(self.turn_taken),
            "turn_latency_s": _mean(self.turn_latency_s),
            "interruptions": len(self.interruption_taken),
            "interruption_tor": _mean(self.interruption_taken),
            "stop_latency_s": _mean(self.stop_latency_s),
            "floor_s": round(self.floor_s, 3),
            "model_backchannels": len(self.model_backchannels),
            "unscored": self.unscored,
        }


def _mean(values: Sequence[float | bool]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def score_dialogue(
    name: str,
    events: Sequence[Event],
    model: Speech,
    user_words: Sequence[Word],
    speaker_words: Sequence[Word] = (),
    duration: float = float("inf"),
) -> DialogueScore:
    """Score one dialogue: its events, the model channel's speech, the user's words (for
    when the user holds the floor), the reference speaker's words (for where the dialogue's
    own listener backchannels fall; empty: none) and the recording's length in seconds."""
    score = DialogueScore(name)
    user_floor = floor(user_words, events, USER)
    for e in events:
        if e.kind == "pause":
            stretch = _containing(user_floor, e.start) or (e.start, e.end + RESPONSE_WINDOW_S)
            score.pause_taken.append(takes_turn(model, e.start, max(stretch[1], e.end)))
            continue
        if e.kind not in ("turn_end", "interruption"):
            continue
        t = e.start if e.kind == "turn_end" else e.end  # responses count from here
        if duration - t < MIN_WINDOW_S:
            score.unscored += 1
            continue
        window = (t, min(t + RESPONSE_WINDOW_S, duration))
        taken = takes_turn(model, *window)
        first = onset(model, *window, lookback=OVERLAP_S if e.kind == "turn_end" else 0.0)
        if e.kind == "turn_end":
            score.turn_taken.append(taken)
            if taken and first is not None:
                score.turn_latency_s.append(first - t)
            continue
        score.interruption_taken.append(taken)
        if taken and first is not None:
            score.interruption_latency_s.append(first - t)
        run = _containing(_runs(model.segments), e.start)
        if run is not None:
            score.stop_latency_s.append(run[1] - e.start)
    for a, b in user_floor:
        score.floor_s += b - a
        score.floor_taken.append(takes_turn(model, a, b))
    for a, b in model.segments:
        stretch = _containing(user_floor, a)
        words = sum(a <= w.start < b for w in model.words)
        if stretch and b - a < BACKCHANNEL_S and words <= BACKCHANNEL_WORDS:
            score.model_backchannels.append((a - stretch[0]) / max(stretch[1] - stretch[0], 1e-6))
    speaker_floor = floor(speaker_words, events, ASSISTANT)
    for e in events:
        stretch = _containing(speaker_floor, e.start) if e.kind == "backchannel" else None
        if stretch:
            score.listener_backchannels.append((e.start - stretch[0]) / (stretch[1] - stretch[0]))
    return score


def js_distance(a: Sequence[float], b: Sequence[float], bins: int = JSD_BINS) -> float | None:
    """Jensen-Shannon distance (base 2) between the histograms of positions in [0, 1]."""
    if not len(a) or not len(b):
        return None
    from scipy.spatial.distance import jensenshannon

    edges = np.linspace(0.0, 1.0, bins + 1)
    p = np.histogram(np.clip(a, 0, 1), edges)[0].astype(np.float64)
    q = np.histogram(np.clip(b, 0, 1), edges)[0].astype(np.float64)
    return float(jensenshannon(p / p.sum(), q / q.sum(), base=2))


def aggregate(scores: Sequence[DialogueScore]) -> dict[str, Any]:
    """metrics.json's content: each metric pooled over the dialogues' events, and per-dialogue
    rows. Rates and latencies are null where no dialogue had that kind of event."""

    def pooled(field: str) -> list[Any]:
        return [v for s in scores for v in getattr(s, field)]

    floor_s = sum(s.floor_s for s in scores)
    stops = pooled("stop_latency_s")
    model_bc, listener_bc = pooled("model_backchannels"), pooled("listener_backchannels")
    pauses = pooled("pause_taken")
    return {
        "pause_handling": {"tor": _mean(pauses), "events": len(pauses)},
        "backchannel": {
            "tor": _mean(pooled("floor_taken")),
            "frequency": len(model_bc) / floor_s if floor_s > 0 else None,
            "jsd": js_distance(model_bc, listener_bc),
            "model_backchannels": len(model_bc),
            "floor_s": round(floor_s, 3),
            "events": len(pooled("floor_taken")),
        },
        "smooth_turn_taking": {
            "tor": _mean(pooled("turn_taken")),
            "latency_s": _mean(pooled("turn_latency_s")),
            "events": len(pooled("turn_taken")),
        },
        "user_interruption": {
            "tor": _mean(pooled("interruption_taken")),
            "latency_s": _mean(stops),
            "response_latency_s": _mean(pooled("interruption_latency_s")),
            "stop_rate": _mean([s <= STOP_WITHIN_S for s in stops]),
            "talking_at_barge_in": len(stops),
            "events": len(pooled("interruption_taken")),
        },
        "unscored_events": sum(s.unscored for s in scores),
        "dialogues": [s.row() for s in scores],
    }


__all__ = [
    "DialogueScore",
    "aggregate",
    "floor",
    "js_distance",
    "onset",
    "score_dialogue",
    "takes_turn",
]
