"""`sfm eval codec`: a codec checkpoint beside classical codecs at comparable bitrates.

For each utterance of each set (a manifest folder: synthetic speech from `sfm data synth`,
real speech from `sfm data eval-set`), the original and every system's resynthesis are
measured against it:

- mel distance (the codec loss's multi-scale log-mel L1) and SI-SDR, at the codec's rate;
- STOI (pystoi) and PESQ wide-band (pesq), at 16 kHz;
- speaker similarity: cosine of resemblyzer's speaker embeddings (its encoder ships inside
  its wheel) of original and resynthesis;
- WER of pocketsphinx's transcript (`sfm.eval.speech`) against the utterance's text (the
  manifest's "text", else its alignment's words); the original's own WER is the ASR's floor.

Each resynthesis is first aligned to its original (`aligned`: the system's delay, found by
cross-correlation, is taken out). Classical anchors run through ffmpeg: codec2 at 1200 and
3200 bit/s (8 kHz) and Opus at 6 kbit/s. Each row prints its bitrate. Utterances that
cannot be read are skipped with one line naming the file, and counted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sfm.data.audio import AudioError, load_audio, resample, save_audio
from sfm.eval.codec_metrics import mel_distance, si_sdr
from sfm.eval.speech import ASR_RATE, to_16k, transcribe

if TYPE_CHECKING:
    from sfm.codec.files import StreamingCodec

# name -> (bitrate kbit/s, ffmpeg encoder options, the rate it is fed, container suffix)
CLASSICAL: dict[str, tuple[float, list[str], int, str]] = {
    "codec2 1200 bit/s": (1.2, ["-c:a", "libcodec2", "-mode", "1200"], 8000, ".c2"),
    "codec2 3200 bit/s": (3.2, ["-c:a", "libcodec2", "-mode", "3200"], 8000, ".c2"),
    "Opus 6 kbit/s": (6.0, ["-c:a", "libopus", "-b:a", "6k"], 24000, ".ogg"),
}
MAX_DELAY_S = 0.1  # a system's delay is found by cross-correlation up to this
METRICS = ("mel_distance", "si_sdr", "stoi", "pesq_wb", "speaker_sim", "wer")


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One utterance of an evaluation set: its audio at the codec's rate and its text."""

    name: str
    audio: np.ndarray
    text: str | None


def _words(text: str) -> str:
    """Lowercase words without punctuation (what the ASR writes)."""
    return " ".join(re.sub(r"[^a-z' ]+", " ", text.lower()).split())


def read_set(
    root: str | PathLike[str], sample_rate: int, limit: int | None = None
) -> Iterator[Utterance | str]:
    """The utterances of a manifest folder (an unreadable one comes as its error line)."""
    root = Path(root)
    manifest = root / "manifest.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no manifest (expected a `sfm data synth` folder)")
    count = 0
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        if limit is not None and count >= limit:
            return
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            wav = root / row["path"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            yield f"{manifest}:{n}: malformed row ({e})"
            continue
        try:
            audio = load_audio(wav, sample_rate)
        except AudioError as e:
            yield str(e)
            continue
        text = row.get("text")
        aligned = wav.with_suffix(".json")
        if text is None and aligned.is_file():
            try:
                text = " ".join(w for w, *_ in json.loads(aligned.read_text())["alignments"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                yield f"{aligned}: malformed alignments ({e})"
                continue
        count += 1
        yield Utterance(wav.stem, audio, _words(text) if text else None)


def aligned(ref_t: np.ndarray, est_t: np.ndarray, sample_rate: int) -> np.ndarray:
    """`est` advanced by its delay behind `ref` (0 to 100 ms, the lag of the largest
    cross-correlation), zero-filled at the end: codecs delay their output (codec2 by tens of
    ms) and STOI, PESQ and SI-SDR would count the delay as distortion."""
    from scipy.signal import correlate

    n = len(ref_t)
    corr = correlate(est_t[:n], ref_t, mode="full", method="fft")[n - 1 :]  # lags 0, 1, ...
    lag = int(np.argmax(corr[: int(MAX_DELAY_S * sample_rate) + 1]))
    out = np.zeros_like(ref_t)
    out[: n - lag] = est_t[lag:n]
    return out


def classical(audio_t: np.ndarray, sample_rate: int, system: str) -> np.ndarray:
    """`audio_t` through a classical codec of `CLASSICAL` (ffmpeg), back at `sample_rate`."""
    return encode_classical(audio_t, sample_rate, system)[0]


def encode_classical(audio_t: np.ndarray, sample_rate: int, system: str) -> tuple[np.ndarray, int]:
    """(`classical`'s result, the size in bytes of the coded file)."""
    _, options, rate, suffix = CLASSICAL[system]
    with tempfile.TemporaryDirectory() as tmp:
        src, coded, out = Path(tmp, "in.wav"), Path(tmp, "coded" + suffix), Path(tmp, "out.wav")
        save_audio(src, resample(audio_t, sample_rate, rate), rate)
        quiet = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y"]
        subprocess.run([*quiet, "-i", src, "-ac", "1", *options, coded], check=True)
        subprocess.run([*quiet, "-i", coded, "-ar", str(sample_rate), out], check=True)
        decoded, size = load_audio(out, sample_rate), coded.stat().st_size
    fitted = np.zeros_like(audio_t)
    fitted[: min(len(decoded), len(audio_t))] = decoded[: len(audio_t)]
    return fitted, size


@functools.cache
def _speaker_encoder() -> Any:
    import warnings

    with warnings.catch_warnings():  # its VAD dependency imports pkg_resources
        warnings.simplefilter("ignore")
        from resemblyzer import VoiceEncoder

    return VoiceEncoder("cpu", verbose=False)


def speaker_similarity(ref_16k: np.ndarray, est_16k: np.ndarray) -> float:
    """Cosine similarity of resemblyzer's speaker embeddings of two 16 kHz signals."""
    from resemblyzer import preprocess_wav

    encoder = _speaker_encoder()
    a, b = (encoder.embed_utterance(preprocess_wav(x, ASR_RATE)) for x in (ref_16k, est_16k))
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _pesq(ref_16k: np.ndarray, est_16k: np.ndarray) -> float | None:
    """PESQ-WB, None where it finds no utterance in the reference (silence)."""
    from pesq import PesqError, pesq

    score = pesq(ASR_RATE, ref_16k, est_16k, "wb", on_error=PesqError.RETURN_VALUES)
    return None if score < 0 else float(score)


def measure(ref_t: np.ndarray, est_t: np.ndarray, sample_rate: int, text: str | None) -> dict:
    """Every metric of `est` against `ref` (WER None without a text)."""
    import jiwer
    from pystoi import stoi

    ref16, est16 = to_16k(ref_t, sample_rate), to_16k(est_t, sample_rate)
    heard = transcribe(est16, ASR_RATE)
    return {
        "mel_distance": mel_distance(ref_t, est_t, sample_rate),
        "si_sdr": si_sdr(ref_t, est_t),
        "stoi": float(stoi(ref16, est16, ASR_RATE, extended=False)),
        "pesq_wb": _pesq(ref16, est16),
        "speaker_sim": speaker_similarity(ref16, est16),
        "wer": float(jiwer.wer(text, heard or "<nothing>")) if text else None,
    }


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def evaluate(
    systems: dict[str, tuple[float, Callable[[np.ndarray], np.ndarray]]],
    sets: dict[str, str | PathLike[str]],
    sample_rate: int,
    limit: int | None = None,
) -> dict[str, Any]:
    """{set: {"rows": {system: {bitrate_kbps, metric means}}, "utterances", "skipped"}}
    for `systems` {name: (bitrate, audio -> resynthesis)}; the "original" row is the
    input itself (its WER is the ASR's own)."""
    from tqdm import tqdm

    out: dict[str, Any] = {}
    for set_name, root in sets.items():
        per: dict[str, list[dict]] = {"original": [], **{s: [] for s in systems}}
        skipped: list[str] = []
        items = list(read_set(root, sample_rate, limit))
        for item in tqdm(items, desc=f"codec eval: {set_name}", unit="utt"):
            if isinstance(item, str):
                print(f"eval codec: skipped: {item}")
                skipped.append(item)
                continue
            try:  # every system or none: the rows average the same utterances
                rows = {"original": measure(item.audio, item.audio, sample_rate, item.text)}
                for name, (_, run) in systems.items():
                    est = aligned(item.audio, run(item.audio), sample_rate)
                    rows[name] = measure(item.audio, est, sample_rate, item.text)
            except (subprocess.CalledProcessError, ValueError, RuntimeError) as e:
                reason = f"{item.name}: {type(e).__name__}: {e}"
                print(f"eval codec: skipped: {reason}")
                skipped.append(reason)
                continue
            for name, row in rows.items():
                per[name].append(row)
        bitrates = {"original": None, **{s: b for s, (b, _) in systems.items()}}
        out[set_name] = {
            "utterances": len(per["original"]),
            "skipped": {"count": len(skipped), "reasons": skipped},
            "rows": {
                name: {"bitrate_kbps": bitrates[name], **{m: _mean(rows, m) for m in METRICS}}
                for name, rows in per.items()
            },
        }
    return out


def classical_systems(sample_rate: int) -> dict[str, tuple[float, Callable]]:
    """The anchors of `CLASSICAL` as `evaluate` systems."""
    return {
        name: (kbps, functools.partial(classical, sample_rate=sample_rate, system=name))
        for name, (kbps, *_) in CLASSICAL.items()
    }


def codec_system(
    checkpoint: str | PathLike[str], config: str | None = None
) -> tuple[str, int, tuple[float, Callable[[np.ndarray], np.ndarray]]]:
    """(row name, sample rate, (bitrate, resynthesis)) of an sfm or Kyutai Mimi codec
    checkpoint, run as it is served: the streaming codec, compiled once."""
    from sfm.codec.files import streaming_codec
    from sfm.io.codec import build_codec, load_run_config

    cfg = load_run_config(config, checkpoint, ())
    codec = streaming_codec(build_codec(cfg, checkpoint))
    return streaming_system(codec, Path(checkpoint).name)


def streaming_system(
    codec: StreamingCodec, label: str
) -> tuple[str, int, tuple[float, Callable[[np.ndarray], np.ndarray]]]:
    """`codec_system` of a streaming codec already built (`sfm.codec.files.StreamingCodec`),
    its row named after `label`; compiled here unless it already is."""
    from sfm.codec.files import bitrate_kbps, decode_codes, encode_wav, warm_up

    warm_up(codec)
    run = lambda audio: decode_codes(codec, encode_wav(codec, audio), len(audio))
    name = f"{label} ({codec.cfg.n_q} codebooks)"
    return name, codec.cfg.sample_rate, (bitrate_kbps(codec.cfg), run)


def manifest_rows(folder: Path) -> int:
    """Rows of a folder's manifest (0 without one)."""
    manifest = folder / "manifest.jsonl"
    return sum(1 for line in manifest.open() if line.strip()) if manifest.is_file() else 0


def default_sets(out: Path, utterances: int = 24) -> dict[str, Path]:
    """The two evaluation sets under out/sets, made unless already there: flite speech
    (synthetic, with texts; seed 11, apart from the quickstart's corpora) and the real
    recordings of `sfm data eval-set`."""
    from sfm.data.real_speech import build_eval_set
    from sfm.data.synth_corpus import synth_corpus

    sets = {"synthetic (flite)": out / "sets" / "flite", "real speech": out / "sets" / "real"}
    flite = sets["synthetic (flite)"]
    if manifest_rows(flite) < utterances:  # absent, or made for fewer utterances: made again
        shutil.rmtree(flite, ignore_errors=True)
        minutes = utterances * 12 / 60  # utterances run 4-12 s
        print(synth_corpus(flite, minutes, engine="flite", seed=11).line())
    if not (sets["real speech"] / "manifest.jsonl").is_file():
        print(build_eval_set(sets["real speech"]).line())
    return sets


def eval_codec(
    checkpoint: str | PathLike[str],
    out: str | PathLike[str],
    sets: dict[str, str | PathLike[str]] | None = None,
    limit: int | None = None,
    config: str | None = None,
    built: tuple[str, int, tuple[float, Callable[[np.ndarray], np.ndarray]]] | None = None,
) -> dict[str, Any]:
    """`sfm eval codec`: the checkpoint and the classical anchors on every set; writes
    out/metrics.json and out/report.md with its plot. `built`: the checkpoint's
    `codec_system`, when the caller already has it."""
    from sfm.eval.report import write_codec_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name, rate, system = built or codec_system(checkpoint, config)
    results = evaluate(
        {name: system, **classical_systems(rate)}, sets or default_sets(out), rate, limit
    )
    (out / "metrics.json").write_text(json.dumps(results, indent=1))
    write_codec_report(out, results)
    return results


__all__ = [
    "codec_system",
    "streaming_system",
    "default_sets",
    "eval_codec",
    "CLASSICAL",
    "METRICS",
    "Utterance",
    "aligned",
    "classical",
    "classical_systems",
    "encode_classical",
    "evaluate",
    "measure",
    "read_set",
    "speaker_similarity",
]
