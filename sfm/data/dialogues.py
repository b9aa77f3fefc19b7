"""Synthetic two-speaker dialogues in moshi-finetune layout, with turn-taking events.

Each dialogue is a stereo 24 kHz WAV (left = assistant, the model's voice; right = user), an
alignments JSON with every word's span and speaker, and an events JSON listing what a
full-duplex model must handle: turn ends (with the gap or overlap before the reply), user
pauses mid-turn that the assistant must not take, backchannels from the listener, and user
interruptions after which the assistant stops. Everything is drawn from a seeded RNG.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import time
from dataclasses import asdict, dataclass, field, replace
from os import PathLike
from pathlib import Path

import numpy as np

from sfm.data.audio import save_audio
from sfm.data.synth import (
    FRAME_S,
    SynthError,
    Utterance,
    Voice,
    WordTiming,
    frame_db,
    synthesize,
    voices,
)
from sfm.data.synth_corpus import Summary
from sfm.data.text import QAPair, qa_pairs, sentences

SAMPLE_RATE = 24000
ASSISTANT, USER = "SPEAKER_MAIN", "SPEAKER_USER"
BACKCHANNELS = ("yeah", "uh-huh", "right", "okay", "mm-hmm")
HESITATIONS = ("so", "um, okay", "well", "hmm, let me think")
WORKERS = 2
FADE_S = 0.02
HEARD_DB = -35.0  # a frame this loud (dB below the loudest) is speech, not flite's padding
EDGE_FADE_S = 0.005
MIN_REPLY_WORDS = 4  # a shorter answer always goes on with a remark


@dataclass(frozen=True)
class Event:
    """A turn-taking event by `speaker` over [start, end] s.

    turn_end: the user's turn ends at `start`, the reply starts at `end` (earlier: overlap).
    pause: the user stops mid-turn and resumes. backchannel: a short listener word.
    interruption: the user speaks over the reply; the assistant stops at `assistant_stop`.
    """

    kind: str  # turn_end | pause | backchannel | interruption
    speaker: str
    start: float
    end: float
    assistant_stop: float | None = None


@dataclass(frozen=True)
class EventShares:
    """How often the user meets a reply. One uniform draw per reply: under `interrupted`
    the user barges into it (replies over 2 s); else under `interrupted + backchannelled`
    the user gives a backchannel (replies over 1.5 s: one of 1.5-2 s, too short to be
    interrupted, gets one on either share)."""

    interrupted: float = 0.3
    backchannelled: float = 0.45

    def __post_init__(self) -> None:
        for name in ("interrupted", "backchannelled"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SynthError(f"{name}: a share in [0, 1], got {getattr(self, name)}")
        if self.interrupted + self.backchannelled > 1.0:
            raise SynthError(
                f"interrupted + backchannelled: at most 1 together, got "
                f"{self.interrupted} + {self.backchannelled}"
            )


@dataclass
class Timeline:
    """Audio being laid out on two channels, with the words placed so far."""

    left: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    right: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    words: list[tuple[str, float, float, str]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def place(self, utt: Utterance, speaker: str, start: float, stop: float | None = None) -> float:
        """Place `utt` at `start` s on its speaker's channel, cut at `stop`; returns its end."""
        audio = utt.audio
        if stop is not None:
            audio = _cut(audio, stop - start)
        i = int(round(start * SAMPLE_RATE))
        channel = "left" if speaker == ASSISTANT else "right"
        track = _grown(getattr(self, channel), i + len(audio))
        track[i : i + len(audio)] += audio
        setattr(self, channel, track)
        end = start + len(audio) / SAMPLE_RATE
        for w in utt.words:
            if start + w.start < end:
                self.words.append((w.word, start + w.start, min(start + w.end, end), speaker))
        return end

    def stereo(self) -> np.ndarray:
        """[T, 2] float32, left = assistant, right = user."""
        n = max(len(self.left), len(self.right))
        return np.stack([_grown(self.left, n), _grown(self.right, n)], axis=1)


def _grown(track: np.ndarray, n: int) -> np.ndarray:
    return (
        track if len(track) >= n else np.concatenate([track, np.zeros(n - len(track), np.float32)])
    )


def _cut(audio: np.ndarray, seconds: float) -> np.ndarray:
    """The first `seconds` of `audio`, ending in a short fade-out."""
    n = max(int(seconds * SAMPLE_RATE), 1)
    out = audio[:n].copy()
    fade = min(int(FADE_S * SAMPLE_RATE), len(out))
    out[len(out) - fade :] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    return out


def trimmed(utt: Utterance, sample_rate: int = SAMPLE_RATE, margin_s: float = 0.01) -> Utterance:
    """`utt` cut to its words, widened over any loud frames (within 35 dB of the loudest)
    that run on from them, plus `margin_s` each side, faded in and out over 5 ms; timings
    shifted to match, the first word starting where that span does and the last ending there.

    flite pads an utterance with 0.1-0.3 s of noise 35-70 dB below its speech at each end
    (kal16 also clicks in its first 60 ms): a codec encodes it as sound, so speech placed at
    t would begin at t for the codec and only after the padding for a listener."""
    if not utt.words:
        return utt
    loud = frame_db(utt.audio, sample_rate) > HEARD_DB
    a, b = int(utt.words[0].start / FRAME_S), int(np.ceil(utt.words[-1].end / FRAME_S))
    while 0 < a <= len(loud) and loud[a - 1]:
        a -= 1
    while b < len(loud) and loud[b]:
        b += 1
    duration = len(utt.audio) / sample_rate
    first, last = (
        min(utt.words[0].start, a * FRAME_S),
        min(max(utt.words[-1].end, b * FRAME_S), duration),
    )
    start = max(0, int((first - margin_s) * sample_rate))
    end = min(len(utt.audio), int(np.ceil((last + margin_s) * sample_rate)))
    shift = start / sample_rate
    words = [WordTiming(w.word, w.start - shift, w.end - shift) for w in utt.words]
    words[0].start, words[-1].end = first - shift, last - shift
    audio = utt.audio[start:end].copy()
    fade = min(int(EDGE_FADE_S * sample_rate), len(audio) // 2)
    ramp = np.linspace(0.0, 1.0, fade, endpoint=False, dtype=np.float32)
    audio[:fade] *= ramp
    audio[len(audio) - fade :] *= ramp[::-1]
    return replace(utt, audio=audio, words=words)


def _say(text: str, voice: Voice) -> Utterance:
    """`text` spoken by `voice` without the engine's padding: a reply placed at t is heard
    from t, as the events say (see `trimmed`)."""
    return trimmed(synthesize(text, voice, SAMPLE_RATE))


def _answer_text(qa: QAPair, rng: random.Random, extra: list[str]) -> str:
    """The assistant's reply: the answer, followed by a longer remark sometimes, and always
    after an answer of fewer than `MIN_REPLY_WORDS` words ("Yes.", "New York."): a reply
    holds the floor as a sentence, not as a word or two a listener (or Full-Duplex-Bench)
    would take for a backchannel."""
    text = (
        f"The answer is {qa.answer}." if qa.kind == "arithmetic" else f"{qa.answer.capitalize()}."
    )
    remark = rng.random() < 0.6
    if remark or len(text.split()) < MIN_REPLY_WORDS:
        text += " " + rng.choice(extra)
    return text


def _user_turn(tl: Timeline, qa: QAPair, user: Voice, start: float, rng: random.Random) -> float:
    """The user's question, sometimes with a mid-turn pause the assistant must wait through."""
    question = f"{qa.question.capitalize()}?"
    if rng.random() < 0.35:
        first = tl.place(_say(rng.choice(HESITATIONS) + ",", user), USER, start)
        resume = first + rng.uniform(0.6, 1.3)
        tl.events.append(Event("pause", USER, first, resume))
        start = resume
    return tl.place(_say(question, user), USER, start)


def _assistant_turn(
    tl: Timeline,
    text: str,
    voices_: tuple[Voice, Voice],
    start: float,
    rng: random.Random,
    follow_up: QAPair,
    shares: EventShares,
) -> tuple[float, QAPair | None]:
    """The reply, maybe backchannelled or interrupted; returns (end, interrupting question)."""
    assistant, user = voices_
    reply = _say(text, assistant)
    length = len(reply.audio) / SAMPLE_RATE
    roll = rng.random()
    if length > 2.0 and roll < shares.interrupted:
        t_int = start + rng.uniform(0.35, 0.65) * length
        stop = t_int + rng.uniform(0.2, 0.45)
        tl.place(reply, ASSISTANT, start, stop=stop)
        end = tl.place(_say(f"Wait, {follow_up.question}?", user), USER, t_int)
        tl.events.append(Event("interruption", USER, t_int, end, assistant_stop=stop))
        return end, follow_up
    end = tl.place(reply, ASSISTANT, start)
    if length > 1.5 and roll < shares.interrupted + shares.backchannelled:
        t_bc = start + rng.uniform(0.3, 0.7) * length
        bc_end = tl.place(_say(rng.choice(BACKCHANNELS), user), USER, t_bc)
        tl.events.append(Event("backchannel", USER, t_bc, bc_end))
    return end, None


def render_dialogue(
    seed: int,
    assistant: Voice,
    user: Voice,
    exchanges: int = 3,
    shares: EventShares = EventShares(),
) -> Timeline:
    """One dialogue of `exchanges` question/answer exchanges, laid out on two channels."""
    rng = random.Random(seed)
    qas, extra = qa_pairs(exchanges * 2, seed), sentences(8, seed)
    tl, t, pending = Timeline(), 0.2, None
    for i in range(exchanges):
        qa = pending or qas[i]
        if pending is None:
            t = _user_turn(tl, qa, user, t, rng)
        gap = rng.uniform(-0.15, 0.7)  # negative: the reply overlaps the end of the question
        tl.events.append(Event("turn_end", USER, t, t + gap))
        t, pending = _assistant_turn(
            tl,
            _answer_text(qa, rng, extra),
            (assistant, user),
            t + gap,
            rng,
            qas[exchanges + i],
            shares,
        )
        if pending is None:  # a short silence before the user's next question
            t += rng.uniform(0.4, 1.0)
    return tl


def _voices(rng: random.Random) -> tuple[Voice, Voice]:
    """A clear assistant voice (flite when installed) and a varied user voice (espeak-ng)."""
    clear = voices("flite") or voices("espeak")
    assistant = rng.choice(clear)
    user = replace(
        rng.choice(voices("espeak")), rate=rng.randint(150, 200), pitch=rng.randint(30, 70)
    )
    return assistant, user


def _write(args: tuple[int, int, Path, EventShares]) -> tuple[str, float]:
    """Write dialogue `index`: WAV, alignments and events; returns (path, duration)."""
    index, seed, out, shares = args
    rng = random.Random(seed * 1_000_003 + index)
    assistant, user = _voices(rng)
    tl = render_dialogue(
        rng.randrange(2**31), assistant, user, exchanges=rng.randint(2, 4), shares=shares
    )
    audio = tl.stereo()
    peak = float(np.abs(audio).max()) or 1.0
    name = f"dialogue_{index:06d}"
    save_audio(out / "wav" / f"{name}.wav", audio / max(peak, 1.0), SAMPLE_RATE)
    rows = [
        [w, [round(s, 3), round(e, 3)], spk]
        for w, s, e, spk in sorted(tl.words, key=lambda r: r[1])
    ]
    (out / "wav" / f"{name}.json").write_text(json.dumps({"alignments": rows}))
    events = [asdict(e) for e in sorted(tl.events, key=lambda e: e.start)]
    (out / "wav" / f"{name}.events.json").write_text(json.dumps({"events": events}))
    return f"wav/{name}.wav", len(audio) / SAMPLE_RATE


def synth_dialogues(
    out_dir: str | PathLike[str],
    minutes: float = 10.0,
    seed: int = 0,
    shares: EventShares = EventShares(),
) -> Summary:
    """Write at least `minutes` of stereo dialogues with alignments, events and a manifest;
    `shares`: how often replies are interrupted or backchannelled (the held-out sets keep
    the default)."""
    t0, out = time.perf_counter(), Path(out_dir)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, float]] = []
    with multiprocessing.get_context("spawn").Pool(WORKERS) as workers:
        while (missing := minutes * 60 - sum(d for _, d in rows)) > 0:
            batch = [
                (len(rows) + i, seed, out, shares) for i in range(max(2, int(missing / 15) + 1))
            ]
            rows += workers.map(_write, batch)
    with (out / "manifest.jsonl").open("w") as f:
        for path, duration in rows:
            f.write(json.dumps({"path": path, "duration": round(duration, 4)}) + "\n")
    return Summary(out, len(rows), sum(d for _, d in rows), time.perf_counter() - t0)
