"""A synthetic speech corpus in moshi-finetune layout: wav/*.wav + wav/*.json + manifest.jsonl."""

from __future__ import annotations

import json
import multiprocessing
import random
import time
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path

from sfm.data.audio import save_audio
from sfm.data.synth import ENGINES, SynthError, Utterance, Voice, synthesize, voices
from sfm.data.text import qa_pairs, read_text_file, sentences

SAMPLE_RATE = 24000
SPEAKER = "SPEAKER_MAIN"
WORKERS = 2
SENTENCES_PER_FILE = (2, 5)
TEXT_POOL = 4000


@dataclass(frozen=True)
class Job:
    """One file to write: its index, text and voice."""

    index: int
    text: str
    voice: Voice


@dataclass(frozen=True)
class Summary:
    """What a corpus run wrote and how fast."""

    out_dir: Path
    files: int
    audio_s: float
    wall_s: float

    def line(self) -> str:
        """A one-line report for the command line."""
        speed = self.audio_s / max(self.wall_s, 1e-9)
        return (
            f"{self.out_dir}: {self.files} files, {self.audio_s / 60:.2f} min of audio "
            f"in {self.wall_s:.1f} s ({speed:.0f}x real time)"
        )


def _texts(seed: int, text_file: str | PathLike[str] | None) -> list[str]:
    """The sentence pool: the user's file, else generated sentences mixed with Q&A turns."""
    if text_file is not None:
        try:
            return read_text_file(text_file)
        except ValueError as e:
            raise SynthError(str(e)) from None
    pool = sentences(TEXT_POOL, seed)
    pool += [f"{_cap(q.question)}? {_cap(q.answer)}." for q in qa_pairs(TEXT_POOL // 3, seed)]
    random.Random(seed).shuffle(pool)
    return pool


def _cap(text: str) -> str:
    """Upper-case the first letter."""
    return text[:1].upper() + text[1:]


def _voice_pool(engine: str) -> list[Voice]:
    """Voices of one engine or both."""
    engines = ENGINES if engine == "both" else (engine,)
    return [v for e in engines for v in voices(e)]


def _varied(voice: Voice, rng: random.Random) -> Voice:
    """The voice at a random speaking rate and pitch."""
    return replace(voice, rate=rng.randint(140, 210), pitch=rng.randint(30, 70))


def _job(index: int, texts: list[str], pool: list[Voice], rng: random.Random) -> Job:
    """A file of a few consecutive sentences spoken by one random voice."""
    k = rng.randint(*SENTENCES_PER_FILE)
    start = rng.randrange(len(texts))
    text = " ".join(texts[(start + i) % len(texts)] for i in range(k))
    return Job(index, text, _varied(rng.choice(pool), rng))


def _alignments(utt: Utterance) -> dict[str, list[list[object]]]:
    """The moshi-finetune JSON for an utterance."""
    rows = [[w.word, [round(w.start, 3), round(w.end, 3)], SPEAKER] for w in utt.words]
    return {"alignments": rows}


def _write(job_and_dir: tuple[Job, Path]) -> tuple[str, float]:
    """Synthesize one job, write its WAV and JSON; returns (relative path, duration)."""
    job, out_dir = job_and_dir
    utt = synthesize(job.text, job.voice, SAMPLE_RATE)
    name = f"{job.index:06d}_{job.voice.engine}"
    wav_path = out_dir / "wav" / f"{name}.wav"
    save_audio(wav_path, utt.audio, SAMPLE_RATE)
    wav_path.with_suffix(".json").write_text(json.dumps(_alignments(utt)))
    return f"wav/{name}.wav", len(utt.audio) / SAMPLE_RATE


def _estimate_s(text: str, voice: Voice) -> float:
    """A rough spoken duration of `text`, for planning how many files to make."""
    return len(text.split()) * 60.0 / voice.rate + 0.3 * text.count(".")


def _plan(
    seconds: float, texts: list[str], pool: list[Voice], rng: random.Random, first: int
) -> list[Job]:
    """Jobs, numbered from `first`, whose estimated total duration reaches `seconds`."""
    jobs: list[Job] = []
    total = 0.0
    while total < seconds:
        jobs.append(_job(first + len(jobs), texts, pool, rng))
        total += _estimate_s(jobs[-1].text, jobs[-1].voice)
    return jobs


def _pool(engine: str) -> list[Voice]:
    """The voice pool, checked to be non-empty."""
    if engine not in (*ENGINES, "both"):
        raise SynthError(f"unknown engine {engine!r} (choose espeak, flite or both)")
    pool = _voice_pool(engine)
    if not pool:
        raise SynthError(f"no voices installed for engine {engine!r}")
    return pool


def synth_corpus(
    out_dir: str | PathLike[str],
    minutes: float = 10.0,
    engine: str = "both",
    seed: int = 0,
    text_file: str | None = None,
) -> Summary:
    """Write at least `minutes` of speech with word alignments and a manifest under `out_dir`."""
    t0, out = time.perf_counter(), Path(out_dir)
    texts, voice_pool = _texts(seed, text_file), _pool(engine)
    rng, rows = random.Random(seed + 1), []
    (out / "wav").mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("spawn").Pool(WORKERS) as workers:
        while (missing := minutes * 60 - sum(d for _, d in rows)) > 0:  # estimates run short
            jobs = _plan(missing, texts, voice_pool, rng, len(rows))
            rows += workers.map(_write, [(job, out) for job in jobs], chunksize=4)
    with (out / "manifest.jsonl").open("w") as f:
        for path, duration in rows:
            f.write(json.dumps({"path": path, "duration": round(duration, 4)}) + "\n")
    audio_s = sum(d for _, d in rows)
    return Summary(out, len(rows), audio_s, time.perf_counter() - t0)
