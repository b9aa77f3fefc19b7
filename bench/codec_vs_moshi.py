"""sfm codec vs moshi's PyTorch Mimi: full config, same weights, same process.

Streaming: ms per 80 ms frame at batch 1 (encode, decode, and both), the median over
`--frames` frames after a warm-up. Each side runs its whole loop on its own: interleaving
them lets each library's spinning worker threads take the cores from the other. Offline:
real-time factor (compute seconds per audio second) for encoding and decoding `--seconds`
of audio.

    NO_TORCH_COMPILE=1 PYTHONPATH=. python bench/codec_vs_moshi.py --frames 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_TORCH_COMPILE", "1")
# First, so that jax starts on the right platform with sfm's host settings.
import sfm.host  # noqa: E402

sfm.host.configure()
import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import moshi  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from sfm.codec.config import CodecConfig  # noqa: E402
from sfm.codec.streaming import StreamingCodec  # noqa: E402
from sfm.testing.moshi_reference import (  # noqa: E402
    build_moshi_mimi,
    numpy_state_dict,
    sfm_from_state_dict,
    speech_like,
)


@partial(jax.jit, static_argnums=(0,))
def _encode(graphdef: Any, state: Any, wav_bt: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).encode(wav_bt)


@partial(jax.jit, static_argnums=(0,))
def _decode(graphdef: Any, state: Any, codes_bkt: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).decode(codes_bkt)


def _ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def _stream_times(
    encode: Callable[[Any], Any], decode: Callable[[Any], Any], wav: Any, fs: int, warmup: int
) -> dict[str, float]:
    """Median ms of encode, decode and both, one frame at a time, after `warmup` frames."""
    times: dict[str, list[float]] = {"encode": [], "decode": [], "step": []}
    for i in range(wav.shape[1] // fs):
        chunk = wav[:, i * fs : (i + 1) * fs]
        t0 = time.perf_counter()
        codes = encode(chunk)
        t1 = time.perf_counter()
        decode(codes)
        t2 = time.perf_counter()
        if i >= warmup:
            times["encode"].append(t1 - t0)
            times["decode"].append(t2 - t1)
            times["step"].append(t2 - t0)
    return {k: _ms(v) for k, v in times.items()}


def streaming(
    tm: torch.nn.Module, codec: StreamingCodec, frames: int, warmup: int
) -> dict[str, dict[str, float]]:
    fs = codec.cfg.frame_size
    wav = speech_like(1, (frames + warmup) * fs / codec.cfg.sample_rate, seed=3)
    with torch.no_grad(), tm.streaming(batch_size=1):
        torch_ms = _stream_times(
            lambda x: tm.encode(torch.from_numpy(x)[:, None]), tm.decode, wav, fs, warmup
        )
    codec.reset()
    sfm_ms = _stream_times(
        lambda x: codec.encode_chunk(x).block_until_ready(),
        lambda c: codec.decode_chunk(c).block_until_ready(),
        wav,
        fs,
        warmup,
    )
    return {"torch": torch_ms, "sfm": sfm_ms}


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `repeats` calls after one untimed call."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def offline(
    tm: torch.nn.Module, graphdef: Any, params: Any, cfg: CodecConfig, seconds: float, repeats: int
) -> dict[str, dict[str, float]]:
    wav = speech_like(1, seconds, cfg.sample_rate, seed=4)
    wav_t = torch.from_numpy(wav)[:, None]
    wav_j = jnp.asarray(wav)
    with torch.no_grad():
        codes_t = tm.encode(wav_t)
        t_enc = _median_time(lambda: tm.encode(wav_t), repeats)
        t_dec = _median_time(lambda: tm.decode(codes_t), repeats)
    codes_j = jnp.asarray(codes_t.numpy(), jnp.int32)
    s_enc = _median_time(lambda: _encode(graphdef, params, wav_j).block_until_ready(), repeats)
    s_dec = _median_time(lambda: _decode(graphdef, params, codes_j).block_until_ready(), repeats)
    return {
        "torch": {"encode_rtf": t_enc / seconds, "decode_rtf": t_dec / seconds},
        "sfm": {"encode_rtf": s_enc / seconds, "decode_rtf": s_dec / seconds},
    }


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "moshi": getattr(moshi, "__version__", "?"),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": len(jax.devices()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": os.getloadavg(),
    }


def table(stream: dict[str, dict[str, float]], off: dict[str, dict[str, float]]) -> str:
    rows = [
        ("streaming encode, ms/frame", stream["torch"]["encode"], stream["sfm"]["encode"]),
        ("streaming decode, ms/frame", stream["torch"]["decode"], stream["sfm"]["decode"]),
        ("streaming encode+decode, ms/frame", stream["torch"]["step"], stream["sfm"]["step"]),
        ("offline encode, RTF", off["torch"]["encode_rtf"], off["sfm"]["encode_rtf"]),
        ("offline decode, RTF", off["torch"]["decode_rtf"], off["sfm"]["decode_rtf"]),
    ]
    lines = ["| measurement | moshi (torch) | sfm (jax) | sfm / torch |", "|---|---:|---:|---:|"]
    for name, t, s in rows:
        lines.append(f"| {name} | {t:.4g} | {s:.4g} | {s / t:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50, help="timed streaming frames")
    parser.add_argument("--warmup", type=int, default=5, help="untimed streaming frames first")
    parser.add_argument("--seconds", type=float, default=10.0, help="offline audio length")
    parser.add_argument("--repeats", type=int, default=3, help="timed offline calls (median)")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    torch.set_num_threads(args.torch_threads)
    cfg = CodecConfig()
    tm = build_moshi_mimi(cfg)
    model = sfm_from_state_dict(numpy_state_dict(tm), cfg)
    graphdef, params = nnx.split(model)
    codec = StreamingCodec(model, batch_size=1)

    env = environment()
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    stream = streaming(tm, codec, args.frames, args.warmup)
    off = offline(tm, graphdef, params, cfg, args.seconds, args.repeats)
    env["load_average_end"] = os.getloadavg()
    print(f"load average at end: {env['load_average_end']}")
    print()
    print(f"Mimi full config, batch 1; streaming median of {args.frames} frames of 80 ms; ")
    print(f"offline median of {args.repeats} calls on {args.seconds:g} s of audio.")
    print()
    print(table(stream, off))
    ratio = stream["sfm"]["step"] / stream["torch"]["step"]
    print(f"\nstreaming frame step ratio sfm/torch: {ratio:.2f} (target <= 0.4)")
    if args.json:
        result = {"environment": env, "args": vars(args) | {"json": str(args.json)}}
        result |= {"streaming_ms": stream, "offline": off, "streaming_step_ratio": ratio}
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
