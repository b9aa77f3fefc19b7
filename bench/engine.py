"""The batched engine against moshi's own loop, and how many conversations keep real time.

CPU (the default on a machine without an accelerator): for each config (tiny, small) and
batch (1, 8), a random moshi Mimi + LMModel is converted into sfm and both run the same
user audio frame by frame in one process, moshi as its server does (streaming
`mimi.encode` -> `LMGen.step` -> `mimi.decode`) and sfm as one `Engine.step` for all slots.
It prints ms per frame (p50/p95/p99), the real-time factor (p50 / frame duration) and the
ratio moshi / sfm (> 1: sfm faster).

GPU or TPU (`--sweep`, the default there): sfm alone, for each config (small, moshi_7b,
random weights) and weight format (bfloat16, int8): ms per frame at batch 1 and the largest
power-of-two batch whose p50 stays within one frame (80 ms for Mimi), beside the
memory-bandwidth bound of a frame step ((LM weight + streaming state bytes) / HBM bandwidth).

    NO_TORCH_COMPILE=1 PYTHONPATH=. python bench/engine.py [--json out.json]
    PYTHONPATH=. python bench/engine.py --sweep --configs small,moshi_7b   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

os.environ.setdefault("NO_TORCH_COMPILE", "1")
import sfm.host  # noqa: E402

sfm.host.configure()  # first: both libraries allocate under sfm's host memory settings

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sfm.codec.model import Mimi  # noqa: E402
from sfm.config import Config, load_config, resolve_preset  # noqa: E402
from sfm.infer.engine import Engine  # noqa: E402
from sfm.lm.generate import SamplingConfig  # noqa: E402
from sfm.lm.model import LM  # noqa: E402
from sfm.testing.audio import gliding_tone  # noqa: E402

# Overrides that give each CPU config an exact moshi equivalent (tiny's depformer width 128
# has none; 96 has).
MOSHI_OVERRIDES: dict[str, list[str]] = {"tiny": ["lm.depth.dim_feedforward=96"], "small": []}
# Peak HBM bandwidth, bytes/s, by the start of jax's device_kind (vendor data sheets).
HBM_BYTES_PER_S: dict[str, float] = {
    "NVIDIA H200": 4.8e12,
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H100": 3.35e12,  # SXM
    "NVIDIA A100": 2.0e12,
    "NVIDIA L4": 0.3e12,
    "TPU v6": 1.64e12,
    "TPU v5p": 2.765e12,
    "TPU v5": 0.819e12,  # v5e ("TPU v5 lite")
    "TPU v4": 1.2e12,
}


def speech_btf(batch: int, frames: int, frame_size: int, seed: int = 0) -> np.ndarray:
    """[B, T, frame] of gliding tones with noise, a different voice per slot."""
    rng = np.random.default_rng(seed)
    out = [gliding_tone(frames * frame_size, rng) for _ in range(batch)]
    return np.stack(out).reshape(batch, frames, frame_size)


def percentiles(ms: list[float] | np.ndarray) -> dict[str, float]:
    p50, p95, p99 = np.percentile(np.asarray(ms), [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


def run_engine(engine: Engine, wav_btf: np.ndarray) -> dict[str, float]:
    """Every slot in a session, one step per frame; the engine's own latency record."""
    engine.warm_up()
    for _ in range(engine.slots):
        engine.join()
    for t in range(wav_btf.shape[1]):
        engine.step(wav_btf[:, t])
    lat = engine.latency_ms()
    return {k: lat[k] for k in ("p50", "p95", "p99")}


# ---- CPU: against moshi -------------------------------------------------------------------


def moshi_pair(cfg: Config) -> tuple[Any, Any, Mimi, LM]:
    """Random moshi Mimi + LMModel shaped like `cfg`, and the same weights in sfm."""
    from sfm.io.moshi_lm import import_moshi_lm
    from sfm.io.moshi_lm_config import moshi_lm_kwargs
    from sfm.testing.moshi_reference import (
        build_moshi_lm,
        build_moshi_mimi,
        numpy_state_dict,
        sfm_from_state_dict,
    )

    mimi = build_moshi_mimi(cfg.codec)
    mimi.set_num_codebooks(cfg.lm.n_q)  # as moshi's server: the LM's codebooks only
    lm = build_moshi_lm(moshi_lm_kwargs(cfg.lm))
    codec = sfm_from_state_dict(numpy_state_dict(mimi), cfg.codec)
    return mimi, lm, codec, import_moshi_lm(numpy_state_dict(lm), cfg=cfg.lm)


def moshi_loop(
    mimi: Any, lm: Any, wav_btf: np.ndarray, greedy: bool, warmup: int
) -> dict[str, float]:
    """moshi's server loop, batched: streaming encode -> LMGen.step -> streaming decode."""
    import torch
    from moshi.models.lm import LMGen

    torch.manual_seed(0)
    gen, ms = LMGen(lm, use_sampling=not greedy), []
    batch = wav_btf.shape[0]
    with torch.no_grad(), mimi.streaming(batch), gen.streaming(batch):
        for t in range(wav_btf.shape[1]):
            frame = torch.from_numpy(wav_btf[:, None, t])
            t0 = time.perf_counter()
            tokens = gen.step(mimi.encode(frame))
            if tokens is not None:
                mimi.decode(tokens[:, 1:]).numpy()
            ms.append((time.perf_counter() - t0) * 1e3)
    return percentiles(ms[warmup:])


def cpu_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    sampling = SamplingConfig(greedy=args.greedy)
    rows = []
    for name in args.configs.split(","):
        cfg = load_config(resolve_preset(name, "lm"), MOSHI_OVERRIDES.get(name, []))
        mimi, tlm, codec, lm = moshi_pair(cfg)
        frame_ms = 1e3 * cfg.codec.frame_size / cfg.codec.sample_rate
        for batch in (int(b) for b in args.batches.split(",")):
            wav = speech_btf(batch, args.warmup + args.frames, cfg.codec.frame_size)
            torch_ms = moshi_loop(mimi, tlm, wav, args.greedy, args.warmup)
            sfm_ms = run_engine(Engine(codec, lm, batch, sampling), wav[:, args.warmup :])
            row = {"config": name, "batch": batch, "frame_ms": frame_ms}
            row |= {"moshi": torch_ms, "sfm": sfm_ms, "ratio": torch_ms["p50"] / sfm_ms["p50"]}
            rows.append(row)
            print(_cpu_line(row), flush=True)
    return rows


def _cpu_line(r: dict[str, Any]) -> str:
    m, s, f = r["moshi"], r["sfm"], r["frame_ms"]
    return (
        f"| {r['config']} | {r['batch']} | {m['p50']:.1f} / {m['p95']:.1f} / {m['p99']:.1f} | "
        f"{m['p50'] / f:.2f} | {s['p50']:.1f} / {s['p95']:.1f} / {s['p99']:.1f} | "
        f"{s['p50'] / f:.2f} | {r['ratio']:.2f} |"
    )


CPU_HEADER = (
    "| config | batch | moshi ms/frame p50/p95/p99 | moshi RTF | sfm ms/frame p50/p95/p99 | "
    "sfm RTF | moshi / sfm |\n|---|---:|---:|---:|---:|---:|---:|"
)

# ---- accelerator: batch sweep -------------------------------------------------------------


def hbm_bytes_per_s(override: float | None) -> float | None:
    if override:
        return override * 1e9
    kind = jax.devices()[0].device_kind
    return next((v for k, v in HBM_BYTES_PER_S.items() if kind.startswith(k)), None)


def sweep_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    sampling = SamplingConfig(greedy=args.greedy)
    bandwidth = hbm_bytes_per_s(args.hbm_gbs)
    rows = []
    for name in args.configs.split(","):
        cfg = load_config(
            resolve_preset(name, "lm"), ["lm.param_dtype=bfloat16", "lm.dtype=bfloat16"]
        )
        codec = Mimi(cfg.codec, rngs=nnx.Rngs(0))
        lm = LM(cfg.lm, rngs=nnx.Rngs(1))
        frame_ms = 1e3 * cfg.codec.frame_size / cfg.codec.sample_rate
        for weights in args.weights.split(","):
            found: dict[int, dict[str, float]] = {}
            state_bytes: dict[int, int] = {}
            batch = 1
            while batch <= args.max_batch:
                try:
                    engine = Engine(codec, lm, batch, sampling, weights=weights)  # type: ignore[arg-type]
                    wav = speech_btf(batch, args.frames, cfg.codec.frame_size)
                    found[batch] = run_engine(engine, wav)
                except jax.errors.JaxRuntimeError as err:  # out of memory: the sweep ends
                    print(f"  {name} {weights} batch {batch}: {str(err).splitlines()[0]}")
                    break
                nbytes = engine.lm_weight_bytes
                state_bytes[batch] = engine.state_bytes
                del engine
                lat = found[batch]
                print(f"  {name} {weights} batch {batch}: p50 {lat['p50']:.1f} ms", flush=True)
                if found[batch]["p50"] > frame_ms:
                    break
                batch *= 2
            real_time = [b for b, lat in found.items() if lat["p50"] <= frame_ms]
            top = max(real_time, default=0)
            # A frame step reads every weight and every slot's state (KV rings) at least once.
            bound = (
                {b: 1e3 * (nbytes + state_bytes[b]) / bandwidth for b in found} if bandwidth else {}
            )
            row = {"config": name, "weights": weights, "frame_ms": frame_ms, "batch_1": found[1]}
            row |= {"max_real_time_batch": top, "lm_weight_bytes": nbytes}
            row |= {"bandwidth_bound_ms": bound, "by_batch": found, "state_bytes": state_bytes}
            rows.append(row)
            print(_sweep_line(row), flush=True)
    return rows


def _sweep_line(r: dict[str, Any]) -> str:
    b1, top, bound = r["batch_1"], r["max_real_time_batch"], r["bandwidth_bound_ms"]
    at_top = f"{r['by_batch'][top]['p50']:.1f}" if top else "-"
    bounds = " / ".join(f"{bound[b]:.2f}" if b in bound else "n/a" for b in (1, top) if b)
    return (
        f"| {r['config']} | {r['weights']} | {b1['p50']:.1f} / {b1['p99']:.1f} | {top} | "
        f"{at_top} | {r['lm_weight_bytes'] / 2**30:.2f} | {bounds} |"
    )


SWEEP_HEADER = (
    "| config | weights | batch 1 ms/frame p50/p99 | largest real-time batch | its p50 ms | "
    "LM weights GiB | bandwidth bound ms (batch 1 / largest) |\n"
    "|---|---|---:|---:|---:|---:|---:|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    on_cpu = jax.default_backend() == "cpu"
    parser.add_argument("--sweep", action="store_true", default=not on_cpu, help="batch sweep")
    parser.add_argument("--configs", default=None, help="lm presets, comma-separated")
    parser.add_argument("--batches", default="1,8", help="CPU: batches to compare")
    parser.add_argument("--weights", default="bfloat16,int8", help="sweep: weight formats")
    parser.add_argument("--frames", type=int, default=40, help="timed frames per run")
    parser.add_argument("--warmup", type=int, default=5, help="CPU: untimed frames first")
    parser.add_argument("--max-batch", type=int, default=256, help="sweep: largest batch")
    parser.add_argument("--hbm-gbs", type=float, default=None, help="HBM bandwidth, GB/s")
    parser.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    args.configs = args.configs or ("small,moshi_7b" if args.sweep else "tiny,small")
    device = jax.devices()[0]
    env = {
        "device": f"{device.platform}: {device.device_kind}",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "load_average": os.getloadavg(),
    }
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(SWEEP_HEADER if args.sweep else CPU_HEADER)
    rows = sweep_rows(args) if args.sweep else cpu_rows(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
