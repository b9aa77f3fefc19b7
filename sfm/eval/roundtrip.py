"""Codec round trip of one signal: encode, decode, and how close it came back, how fast."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from sfm.codec.files import bitrate_kbps, decode_codes, encode_wav
from sfm.codec.streaming import StreamingCodec
from sfm.eval.codec_metrics import mel_distance, si_sdr


@dataclasses.dataclass(frozen=True)
class RoundtripReport:
    """What one encode + decode of a signal cost and how close it came back."""

    seconds: float
    frames: int
    n_q: int
    codes_per_second: float
    bitrate_kbps: float
    mel_distance: float
    si_sdr: float
    encode_rtf: float
    decode_rtf: float

    def rows(self) -> list[tuple[str, str]]:
        """(name, value) pairs for printing as a table."""
        return [
            ("duration", f"{self.seconds:.2f} s"),
            ("frames", str(self.frames)),
            ("codebooks (n_q)", str(self.n_q)),
            ("codes per second", f"{self.codes_per_second:g}"),
            ("bitrate", f"{self.bitrate_kbps:.3f} kbps"),
            ("mel distance", f"{self.mel_distance:.4f}"),
            ("SI-SDR", f"{self.si_sdr:.2f} dB"),
            ("encode real-time factor", f"{self.encode_rtf:.4f}"),
            ("decode real-time factor", f"{self.decode_rtf:.4f}"),
        ]


def format_rows(rows: Sequence[tuple[str, str]]) -> str:
    """Two aligned columns, one row per line."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def roundtrip(codec: StreamingCodec, wav_t: np.ndarray) -> tuple[np.ndarray, RoundtripReport]:
    """Encode then decode `wav_t`; returns the decoded audio and a report against the input."""
    cfg = codec.cfg
    seconds = wav_t.shape[0] / cfg.sample_rate
    start = time.perf_counter()
    codes_kt = encode_wav(codec, wav_t)
    encoded = time.perf_counter()
    out_t = decode_codes(codec, codes_kt, wav_t.shape[0])
    decoded = time.perf_counter()
    report = RoundtripReport(
        seconds=seconds,
        frames=codes_kt.shape[1],
        n_q=codes_kt.shape[0],
        codes_per_second=cfg.n_q * cfg.frame_rate,
        bitrate_kbps=bitrate_kbps(cfg),
        mel_distance=mel_distance(wav_t, out_t, cfg.sample_rate),
        si_sdr=si_sdr(wav_t, out_t),
        encode_rtf=(encoded - start) / seconds,
        decode_rtf=(decoded - encoded) / seconds,
    )
    return out_t, report
