"""sfm codec (JAX on the default GPU) vs moshi's PyTorch Mimi (CUDA): same weights, one process.

Streaming ms per 80 ms frame at batch 1 (encode + decode) and offline real-time factor.

    NO_TORCH_COMPILE=1 PYTHONPATH=. python bench/codec_gpu.py --frames 100 --seconds 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("NO_TORCH_COMPILE", "1")
# First, so that jax starts on the right platform with sfm's host settings.
import sfm.host  # noqa: E402

sfm.host.configure()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from sfm.codec.config import CodecConfig  # noqa: E402
from sfm.codec.streaming import StreamingCodec  # noqa: E402
from sfm.testing.moshi_reference import (  # noqa: E402
    build_moshi_mimi,
    numpy_state_dict,
    sfm_from_state_dict,
    speech_like,
)


def _median_ms(fn, n: int) -> float:
    for _ in range(3):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return 1000 * statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()
    cfg = CodecConfig()
    tm = build_moshi_mimi(cfg)
    model = sfm_from_state_dict(numpy_state_dict(tm), cfg)
    tm = tm.cuda()
    fs = cfg.frame_size
    frame = speech_like(1, fs / cfg.sample_rate, seed=1)

    codec = StreamingCodec(model, batch_size=1)
    frame_j = jnp.asarray(frame)

    def sfm_step() -> None:
        codec.decode_chunk(codec.encode_chunk(frame_j)).block_until_ready()

    frame_t = torch.from_numpy(frame)[:, None].cuda()
    with torch.no_grad(), tm.streaming(batch_size=1):

        def torch_step() -> None:
            tm.decode(tm.encode(frame_t))
            torch.cuda.synchronize()

        t_stream = _median_ms(torch_step, args.frames)
    s_stream = _median_ms(sfm_step, args.frames)

    wav = speech_like(1, args.seconds, seed=2)
    wav_t = torch.from_numpy(wav)[:, None].cuda()
    wav_j = jnp.asarray(wav)
    enc = jax.jit(lambda w: model.encode(w))
    dec = jax.jit(lambda c: model.decode(c))
    codes_j = enc(wav_j)
    with torch.no_grad():
        codes_t = tm.encode(wav_t)

        def t_off() -> None:
            tm.decode(tm.encode(wav_t))
            torch.cuda.synchronize()

        t_rtf = _median_ms(t_off, 5) / 1000 / args.seconds
    s_rtf = _median_ms(lambda: dec(enc(wav_j)).block_until_ready(), 5) / 1000 / args.seconds
    same = (codes_t.cpu().numpy() == jax.device_get(codes_j)).mean()
    print(f"devices: jax {jax.devices()[0].device_kind}, torch {torch.cuda.get_device_name()}")
    print(f"jax {jax.__version__}, torch {torch.__version__}; offline codes agreeing: {same:.4f}")
    print("| | moshi (PyTorch) | sfm (JAX) | sfm / moshi |")
    print("|---|---|---|---|")
    print(f"| streaming frame (ms) | {t_stream:.2f} | {s_stream:.2f} | {s_stream / t_stream:.2f} |")
    print(
        f"| offline RTF, {args.seconds:.0f} s | {t_rtf:.5f} | {s_rtf:.5f} | {s_rtf / t_rtf:.2f} |"
    )


if __name__ == "__main__":
    main()
