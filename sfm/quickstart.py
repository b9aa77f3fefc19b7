"""The first thing to run: speak a sentence with espeak-ng and send it through the tiny codec."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from sfm.audio import load_audio, save_audio
from sfm.codec_files import (
    RoundtripReport,
    build_codec,
    format_rows,
    load_run_config,
    roundtrip,
    streaming_codec,
    warm_up,
)

SENTENCE = "The quick brown fox jumps over the lazy dog, and the codec turns it into tokens."
DEFAULT_OUT = Path("out/quickstart")
PRESET = "tiny"


class QuickstartError(ValueError):
    """A missing tool or failed step of the quickstart; the message is one line."""


def speak(text: str, path: Path) -> None:
    """Write `text` spoken by espeak-ng (22.05 kHz mono WAV) to `path`."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise QuickstartError("espeak-ng: not installed; run `bash launch/setup.sh` to install it")
    path.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [exe, "-w", os.fspath(path), text], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise QuickstartError(f"espeak-ng: failed to synthesize speech ({reason})")


def run_quickstart(out_dir: Path = DEFAULT_OUT, text: str = SENTENCE) -> RoundtripReport:
    """Synthesize `text`, round-trip it through the randomly initialised tiny codec, save both."""
    cfg = load_run_config(PRESET, None, ())
    speech = out_dir / "input_espeak.wav"
    speak(text, speech)
    wav_t = load_audio(speech, cfg.codec.sample_rate)
    save_audio(out_dir / "input.wav", wav_t, cfg.codec.sample_rate)
    codec = streaming_codec(build_codec(cfg))
    warm_up(codec)
    out_t, report = roundtrip(codec, wav_t)
    save_audio(out_dir / "output.wav", out_t, cfg.codec.sample_rate)
    return report


def main(out_dir: Path = DEFAULT_OUT) -> None:
    """Run the quickstart and print its table and where the audio went."""
    report = run_quickstart(out_dir)
    print("tiny codec (random weights) on an espeak-ng sentence")
    print(format_rows(report.rows()))
    print(f"wrote {out_dir / 'input.wav'} and {out_dir / 'output.wav'}")
