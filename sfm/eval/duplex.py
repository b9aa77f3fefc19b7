"""`sfm eval duplex`: turn-taking metrics of conversations, scored or generated.

A dialogue set is laid out as `sfm data dialogues` writes it: `manifest.jsonl` (one
{"path": "wav/NAME.wav", ...} per line), stereo WAVs (left = the model, right = the user),
and beside each WAV its events (`NAME.events.json`, `sfm.data.dialogues.Event`s) and word
alignments (`NAME.json`, optional: without them the user's words come from ASR).

    score_dialogues("dialogues/", "out/")               # any system's conversations
    converse_dialogues(engine, "held_out/", "out/")      # the model answers each user channel
    through_codec(resynthesize, 24000, "held_out/", "out/")  # the data's replies via a codec

Each writes out/metrics.json (`sfm.eval.turn_taking.aggregate`, plus what was skipped and
why), out/report.md and its plots. A dialogue that cannot be read (missing or corrupt WAV,
malformed events) is skipped with one line naming the file, and counted. Dialogues are
scored in worker processes (spawned, one per core): a script calling these at its top level
needs an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from tqdm import tqdm

from sfm.data.dialogues import ASSISTANT, USER, Event
from sfm.eval.report import write_duplex_report
from sfm.eval.speech import Speech, Word, listen
from sfm.eval.turn_taking import RESPONSE_WINDOW_S, DialogueScore, aggregate, score_dialogue

EVENT_KINDS = ("turn_end", "pause", "backchannel", "interruption")
SCORE_WORKERS = 8


class DialogueError(ValueError):
    """A dialogue that cannot be scored (the message names the file)."""


@dataclass(frozen=True)
class Dialogue:
    """One conversation on disk and what the scorer needs of it."""

    name: str
    wav: Path
    events: list[Event]
    words: list[tuple[Word, str]] | None  # (word, speaker) from the alignments, if any


def read_events(path: Path) -> list[Event]:
    """A dialogue's events (`.events.json`); DialogueError names a missing or bad file."""
    try:
        rows = json.loads(path.read_text())["events"]
        events = [Event(**row) for row in rows]
        for e in events:
            times = (e.start, e.end)
            if e.kind not in EVENT_KINDS or not all(
                isinstance(x, int | float) and np.isfinite(x) for x in times
            ):
                raise ValueError(f"bad event {e}")
    except FileNotFoundError as e:
        raise DialogueError(f"{path}: no events file") from e
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise DialogueError(f"{path}: malformed events ({e})") from e
    return events


def _alignments(path: Path) -> list[tuple[Word, str]] | None:
    if not path.is_file():
        return None
    try:
        rows = json.loads(path.read_text())["alignments"]
        return [(Word(str(w), float(s), float(e)), str(spk)) for w, (s, e), spk in rows]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise DialogueError(f"{path}: malformed alignments ({e})") from e


def read_dialogues(
    root: str | PathLike[str], limit: int | None = None
) -> Iterator[Dialogue | DialogueError]:
    """The dialogues of a set in manifest order (the first `limit` rows); an unreadable one
    comes as its error."""
    root = Path(root)
    manifest = root / "manifest.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no manifest (expected `sfm data dialogues` layout)")
    lines = [(n, line) for n, line in enumerate(manifest.read_text().splitlines(), 1)]
    for n, line in [(n, line) for n, line in lines if line.strip()][:limit]:
        try:
            wav = root / json.loads(line)["path"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            yield DialogueError(f"{manifest}:{n}: malformed row ({e})")
            continue
        stem = wav.with_suffix("")
        try:
            events = read_events(stem.with_name(stem.name + ".events.json"))
            yield Dialogue(stem.name, wav, events, _alignments(wav.with_suffix(".json")))
        except DialogueError as e:
            yield e


def _channels(wav: Path) -> tuple[np.ndarray, int]:
    try:
        audio, rate = sf.read(str(wav), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise DialogueError(f"{wav}: unreadable audio ({e})") from e
    if audio.shape[1] != 2:
        raise DialogueError(f"{wav}: {audio.shape[1]} channels, expected 2 (model, user)")
    if not np.isfinite(audio).all():
        raise DialogueError(f"{wav}: non-finite samples")
    return audio, rate


def score(dialogue: Dialogue) -> tuple[DialogueScore, Speech, Speech | None]:
    """One dialogue's score, the model channel's speech and (without alignments) the
    user channel's."""
    audio, rate = _channels(dialogue.wav)
    model = listen(audio[:, 0], rate)
    user_speech = None
    if dialogue.words is None:
        user_speech = listen(audio[:, 1], rate)
        user_words, speaker_words = list(user_speech.words), []
    else:
        user_words = [w for w, spk in dialogue.words if spk == USER]
        speaker_words = [w for w, spk in dialogue.words if spk == ASSISTANT]
    scored = score_dialogue(
        dialogue.name, dialogue.events, model, user_words, speaker_words, len(audio) / rate
    )
    return scored, model, user_speech


def _score_or_error(
    item: Dialogue | DialogueError,
) -> tuple[DialogueScore, Dialogue, Speech, Speech | None] | DialogueError:
    """(score, dialogue, model's speech, user's speech or None) of a dialogue, or its error."""
    if isinstance(item, DialogueError):
        return item
    try:
        scored, model, user_speech = score(item)
    except DialogueError as e:
        return e
    return scored, item, model, user_speech


def _one_thread() -> None:
    try:
        import torch
    except ImportError:  # listen() names the missing extra
        return
    torch.set_num_threads(1)


def _scored(items: list[Dialogue | DialogueError]) -> Iterator[Any]:
    """`_score_or_error` of each item, in order, the dialogues split over worker processes
    (one per core, at most SCORE_WORKERS): recognizing speech is most of the time."""
    dialogues = sum(isinstance(item, Dialogue) for item in items)
    workers = min(SCORE_WORKERS, len(os.sched_getaffinity(0)), dialogues)
    with (
        tqdm(total=len(items), desc="scoring dialogues", unit="dialogue") as bar,
        ExitStack() as stack,
    ):
        results: Iterator[Any] = map(_score_or_error, items)
        if workers > 1:
            context = multiprocessing.get_context("spawn")  # the parent may run JAX: no fork
            pool = stack.enter_context(context.Pool(workers, initializer=_one_thread))
            results = pool.imap(_score_or_error, items)
        for result in results:
            bar.update()
            yield result


def score_dialogues(
    dialogues: str | PathLike[str],
    out: str | PathLike[str],
    title: str = "Turn-taking",
    limit: int | None = None,
    skipped: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score the dialogues of a set (the first `limit` rows of its manifest); write
    out/metrics.json and out/report.md. `skipped` (reasons) and `extra` (more keys) come
    from a caller that made the set."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores: list[DialogueScore] = []
    reasons = list(skipped)
    example = None
    for item in _scored(list(read_dialogues(dialogues, limit))):
        if isinstance(item, DialogueError):
            print(f"eval duplex: skipped: {item}")
            reasons.append(str(item))
            continue
        scored, dialogue, model, user_speech = item
        scores.append(scored)
        if example is None:
            example = (dialogue, model, user_speech)
    metrics = aggregate(scores)
    metrics["skipped"] = {"count": len(reasons), "reasons": reasons}
    metrics |= extra or {}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    write_duplex_report(out, title, metrics, scores, example)
    return metrics


def converse_dialogues(
    engine: Any, dialogues: str | PathLike[str], out: str | PathLike[str], limit: int | None = None
) -> dict[str, Any]:
    """Feed each dialogue's user channel (right; the first `limit` rows of the manifest)
    through `engine` (an `sfm.infer.engine.Engine`, as many at once as it has slots), then
    4 s of silence so that the last turn can be answered; write the conversations (left:
    the model, right: the user) with the dialogues' events and alignments under
    out/conversations, and score them."""
    from sfm.data.audio import load_audio
    from sfm.infer.converse import converse_many

    out = Path(out)
    tail = np.zeros(int(RESPONSE_WINDOW_S * engine.sample_rate), np.float32)
    read = lambda item: np.concatenate([load_audio(item.wav, engine.sample_rate, 1), tail])
    kept, users, skipped = _load_channels(dialogues, limit, read)
    with tqdm(total=len(kept), desc="conversations", unit="dialogue") as bar:
        talks = converse_many(engine, users, progress=bar.update)
    wavs = out / "conversations" / "wav"
    wavs.mkdir(parents=True, exist_ok=True)
    for item, talk in zip(kept, talks):
        talk.write(wavs / f"{item.name}.wav")  # also NAME.json: the model's text with times
        (wavs / f"{item.name}.json").rename(wavs / f"{item.name}.text.json")
    _write_set(out / "conversations", kept, [t.stereo_tc.shape[0] / t.sample_rate for t in talks])
    rtf = _mean_or_none([t.real_time_factor for t in talks])
    engine_info = {"engine": {"slots": engine.slots, "real_time_factor": rtf}}
    title = "Turn-taking (through the engine)"
    return score_dialogues(out / "conversations", out, title, None, skipped, engine_info)


def through_codec(
    resynthesize: Callable[[np.ndarray], np.ndarray],
    sample_rate: int,
    dialogues: str | PathLike[str],
    out: str | PathLike[str],
    limit: int | None = None,
) -> dict[str, Any]:
    """Score the dialogues with their own assistant channel (left) passed through a codec
    (`resynthesize`: mono audio at `sample_rate` -> the codec's encode + decode of it): what
    a model that spoke exactly like the data, through that codec, would score (with the
    codec's delay, as that model would have it). Beside the clean channel's score this shows
    how much of a model's result its codec decides (the scorer hears speech through VAD and
    ASR). Written to out/dialogues (the set) and out."""
    from sfm.data.audio import resample, save_audio

    out = Path(out)

    def read(item: Dialogue) -> np.ndarray:
        audio_tc, rate = _channels(item.wav)  # read once, checked as scoring checks it
        user_t = resample(audio_tc[:, 1], rate, sample_rate)
        model_t = resynthesize(resample(audio_tc[:, 0], rate, sample_rate))[: len(user_t)]
        return np.stack([np.pad(model_t, (0, len(user_t) - len(model_t))), user_t], axis=1)

    kept, stereo, skipped = _load_channels(dialogues, limit, read)
    wavs = out / "dialogues" / "wav"
    wavs.mkdir(parents=True, exist_ok=True)
    for item, audio_tc in zip(kept, stereo):
        save_audio(wavs / f"{item.name}.wav", audio_tc, sample_rate)
    _write_set(out / "dialogues", kept, [len(a) / sample_rate for a in stereo])
    title = "Turn-taking (the dialogues' own assistant, through the codec)"
    return score_dialogues(out / "dialogues", out, title, None, skipped)


def _load_channels(
    dialogues: str | PathLike[str], limit: int | None, read: Callable[[Dialogue], np.ndarray]
) -> tuple[list[Dialogue], list[np.ndarray], list[str]]:
    """(dialogues, read(dialogue) of each, reasons for those skipped) of a set."""
    from sfm.data.audio import AudioError

    kept, audio, skipped = [], [], []
    for item in read_dialogues(dialogues, limit):
        try:
            if isinstance(item, DialogueError):
                raise item
            audio.append(read(item))
        except (DialogueError, AudioError) as e:
            print(f"eval duplex: skipped: {e}")
            skipped.append(str(e))
            continue
        kept.append(item)
    return kept, audio, skipped


def _write_set(root: Path, dialogues: list[Dialogue], seconds: list[float]) -> None:
    """Beside root/wav/NAME.wav (written by the caller): each dialogue's events and
    alignments, and root/manifest.jsonl."""
    wavs = root / "wav"
    wavs.mkdir(parents=True, exist_ok=True)
    rows = []
    for item, length in zip(dialogues, seconds):
        events = item.wav.with_name(item.name + ".events.json")
        shutil.copy(events, wavs / events.name)
        if item.wav.with_suffix(".json").is_file():
            shutil.copy(item.wav.with_suffix(".json"), wavs / f"{item.name}.json")
        rows.append({"path": f"wav/{item.name}.wav", "duration": round(length, 4)})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


__all__ = [
    "Dialogue",
    "DialogueError",
    "converse_dialogues",
    "read_dialogues",
    "score",
    "score_dialogues",
    "through_codec",
]
