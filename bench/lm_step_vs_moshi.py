"""sfm LM vs moshi's PyTorch LMModel: same config, same weights, same process, float32.

The model is a random moshi LMModel with Moshi 7B's options at reduced size (the "7b_shaped"
test config; flags change the dims), converted into sfm with the interop.

Streaming: ms per frame of moshi's `LMGen.step` against sfm's compiled `Generator.step`
(text and dep_q codebooks sampled with Moshi's defaults, or greedy), median and mean over
`--frames` frames after `--warmup`. Training: frames/s of one forward + backward through the
teacher-forced model and sfm's training loss (the same cross-entropy written in torch for
moshi), the median over `--rounds` blocks of `--iters` iterations per side, the blocks of the
two sides alternating so that both sample the machine's load alike. Each block runs on its
own: interleaving single steps lets each library's worker threads take the cores from the
other. On CPU both run under sfm's host memory settings (sfm.host), which the process shares.

    NO_TORCH_COMPILE=1 PYTHONPATH=. python bench/lm_step_vs_moshi.py --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
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
# First, so that both libraries allocate under the host memory settings sfm makes on CPU.
import sfm.host  # noqa: E402

sfm.host.configure()

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import moshi  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import nnx  # noqa: E402
from moshi.models.lm import LMGen  # noqa: E402

from sfm.io.moshi_lm import import_moshi_lm  # noqa: E402
from sfm.io.moshi_lm_config import lm_config_from_moshi  # noqa: E402
from sfm.lm.config import LMConfig  # noqa: E402
from sfm.lm.generate import Generator, SamplingConfig, _step  # noqa: E402
from sfm.lm.layout import INITIAL, apply_delays  # noqa: E402
from sfm.lm.loss import lm_loss_fn  # noqa: E402
from sfm.testing.moshi_reference import (  # noqa: E402
    SEVEN_B_SHAPED,
    build_moshi_lm,
    numpy_state_dict,
    random_lm_codes,
)


def moshi_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The reduced 7B-shaped moshi `lm_kwargs` with the dims of the command line."""
    return dict(
        SEVEN_B_SHAPED,
        dim=args.dim,
        num_heads=args.num_heads,
        num_layers=args.num_layers,
        depformer_dim=args.depformer_dim,
        depformer_num_heads=args.depformer_heads,
        depformer_num_layers=args.depformer_layers,
        depformer_dim_feedforward=int(4.125 * args.depformer_dim),
        text_card=args.text_card,
        context=args.context,
    )


# ---- streaming -------------------------------------------------------------------------------


def _user_codes(cfg: LMConfig, batch: int, frames: int, seed: int = 1) -> np.ndarray:
    """[B, n_q, T] random user codes."""
    return np.random.default_rng(seed).integers(0, cfg.card, (batch, cfg.n_q, frames))


def moshi_stream(tm: torch.nn.Module, user_bkt: np.ndarray, greedy: bool) -> list[float]:
    """Seconds of each `LMGen.step` (moshi's default sampling unless greedy)."""
    torch.manual_seed(0)
    gen, times = LMGen(tm, use_sampling=not greedy), []
    user = torch.from_numpy(user_bkt.astype(np.int64))
    with torch.no_grad(), gen.streaming(user.shape[0]):
        for t in range(user.shape[2]):
            frame = user[:, :, t : t + 1]
            t0 = time.perf_counter()
            gen.step(frame)
            times.append(time.perf_counter() - t0)
    return times


def sfm_stream(model: Any, user_bkt: np.ndarray, greedy: bool) -> list[float]:
    """Seconds of each `Generator.step`, until its tokens are ready."""
    gen = Generator(model, SamplingConfig(greedy=greedy))
    state, times = gen.init(user_bkt.shape[0], jax.random.key(0)), []
    user = user_bkt.astype(np.int32)
    for t in range(user.shape[2]):
        frame = user[:, :, t]
        t0 = time.perf_counter()
        state, tokens, _ = gen.step(state, frame)
        tokens.block_until_ready()
        times.append(time.perf_counter() - t0)
    return times


def _ms_stats(seconds: list[float]) -> dict[str, float]:
    return {
        "median": 1000.0 * statistics.median(seconds),
        "mean": 1000.0 * statistics.mean(seconds),
        "min": 1000.0 * min(seconds),
    }


def streaming(
    tm: torch.nn.Module, model: Any, batch: int, frames: int, warmup: int, greedy: bool
) -> dict[str, dict[str, float]]:
    user = _user_codes(model.cfg, batch, warmup + frames)
    torch_s = moshi_stream(tm, user, greedy)[warmup:]
    sfm_s = sfm_stream(model, user, greedy)[warmup:]
    return {"torch": _ms_stats(torch_s), "sfm": _ms_stats(sfm_s)}


# ---- training ---------------------------------------------------------------------------------


def _pad_weights(targets: torch.Tensor, pad: int, weight: float) -> torch.Tensor:
    return torch.where(targets == pad, weight, 1.0)


def moshi_loss(out: Any, codes: torch.Tensor, cfg: LMConfig) -> torch.Tensor:
    """The loss of sfm's `lm_loss_fn` on moshi's undelayed logits: weighted text CE (padding token
    down-weighted) + weighted audio CE (semantic codebook up-weighted), each normalised."""
    lw, k = cfg.loss, cfg.dep_q
    text_m = out.text_mask[:, 0]
    text_t = codes[:, 0][text_m]
    text_ce = F.cross_entropy(out.text_logits[:, 0][text_m], text_t, reduction="none")
    text_w = _pad_weights(text_t, cfg.text_pad, lw.text_pad)
    audio_t = codes[:, 1 : 1 + k][out.mask]
    audio_ce = F.cross_entropy(out.logits[out.mask], audio_t, reduction="none")
    per_cb = torch.tensor([lw.semantic] + [lw.acoustic] * (k - 1))
    audio_w = per_cb[None, :, None].expand_as(out.mask)[out.mask]
    text_loss = (text_w * text_ce).sum() / text_w.sum()
    return lw.text * text_loss + (audio_w * audio_ce).sum() / audio_w.sum()


def sfm_tokens(codes_bkt: np.ndarray, cfg: LMConfig) -> tuple[np.ndarray, np.ndarray]:
    """moshi's undelayed codes -> sfm's delayed tokens [B, S, T] and loss mask (the model's
    streams where they hold a real token)."""
    t = codes_bkt.shape[2]
    tokens = np.stack([apply_delays(c, cfg.delays, INITIAL)[:, :t] for c in codes_bkt])
    mask = tokens >= 0
    mask[:, 1 + cfg.n_q :] = False
    return tokens.astype(np.int32), mask


@partial(jax.jit, static_argnums=(0,))
def _value_and_grad(graphdef: Any, params: Any, tokens: jax.Array, mask: jax.Array) -> Any:
    def loss(p: Any) -> jax.Array:
        return lm_loss_fn(nnx.merge(graphdef, p), {"tokens": tokens, "mask": mask})[0]

    return jax.value_and_grad(loss)(params)


def _times(fn: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    """Wall times of `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def training(
    tm: torch.nn.Module,
    model: Any,
    kwargs: dict[str, Any],
    batch: int,
    frames: int,
    iters: int,
    rounds: int,
) -> dict[str, dict[str, Any]]:
    """Per side: frames/s of the median iteration over `rounds` rounds of `iters` (each round
    one block per side, the order alternating), and the ratio of each round's medians."""
    cfg = model.cfg
    codes = random_lm_codes(kwargs, batch, frames, seed=2)
    codes_t = torch.from_numpy(codes)
    tm.train()

    def torch_step() -> float:
        tm.zero_grad(set_to_none=True)
        loss = moshi_loss(tm(codes_t), codes_t, cfg)
        loss.backward()
        return loss.item()

    graphdef, params = nnx.split(model)
    tokens, mask = (jnp.asarray(a) for a in sfm_tokens(codes, cfg))

    def sfm_step() -> float:
        loss, grads = _value_and_grad(graphdef, params, tokens, mask)
        jax.block_until_ready(grads)
        return float(loss)

    steps = {"torch": torch_step, "sfm": sfm_step}
    losses = {name: fn() for name, fn in steps.items()}
    times: dict[str, list[float]] = {"torch": [], "sfm": []}
    round_ratios = []
    for r in range(rounds):
        medians = {}
        for name in ("torch", "sfm") if r % 2 == 0 else ("sfm", "torch"):
            block = _times(steps[name], 1, iters)
            times[name] += block
            medians[name] = statistics.median(block)
        round_ratios.append(medians["torch"] / medians["sfm"])
    result: dict[str, dict[str, Any]] = {}
    for name, ts in times.items():
        seconds = statistics.median(ts)
        result[name] = {"frames_per_s": batch * frames / seconds, "s_per_iter": seconds}
        result[name] |= {"best_s_per_iter": min(ts), "loss": losses[name]}
    result["rounds"] = {"ratios": round_ratios}
    tm.eval()
    return result


# ---- report -----------------------------------------------------------------------------------


def environment(threads: int) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "moshi": getattr(moshi, "__version__", "?"),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "jax_backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": os.getloadavg(),
        # sfm.host: freed host memory kept for reuse (both libraries share the process)
        "host_memory_retained": sfm.host.retained(),
    }


def table(stream: dict[str, dict[str, float]], train: dict[str, dict[str, float]]) -> str:
    rows = [
        ("streaming step, median ms/frame", stream, "median"),
        ("streaming step, mean ms/frame", stream, "mean"),
        ("streaming step, min ms/frame", stream, "min"),
        ("train fwd+bwd, median s/iter", train, "s_per_iter"),
        ("train fwd+bwd, best s/iter", train, "best_s_per_iter"),
        ("train fwd+bwd, frames/s (median)", train, "frames_per_s"),
    ]
    lines = ["| measurement | moshi (torch) | sfm (jax) | sfm / torch |", "|---|---:|---:|---:|"]
    for name, res, key in rows:
        t, s = res["torch"][key], res["sfm"][key]
        lines.append(f"| {name} | {t:.4g} | {s:.4g} | {s / t:.2f} |")
    return "\n".join(lines)


def _layout(cfg: LMConfig) -> str:
    t, d = cfg.temporal, cfg.depth
    if not (t.scan_layers or d.scan_layers):
        return "per-layer parameters (no layer scan)"
    return f"stacked layers, scan unroll temporal {t.scan_unroll} / depth {d.scan_unroll}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100, help="timed streaming frames")
    parser.add_argument("--warmup", type=int, default=10, help="untimed streaming frames first")
    parser.add_argument("--batch", type=int, default=1, help="streaming sessions")
    parser.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--train-frames", type=int, default=125)
    parser.add_argument("--iters", type=int, default=8, help="timed training iterations a block")
    parser.add_argument("--rounds", type=int, default=3, help="training blocks per side")
    parser.add_argument(
        "--remat", default="none", choices=("none", "full", "dots"), help="sfm rematerialisation"
    )
    parser.add_argument(
        "--layers",
        default="per-layer",
        choices=("per-layer", "stacked"),
        help="sfm parameter layout (lm.{temporal,depth}.scan_layers false / true)",
    )
    parser.add_argument(
        "--scan-unroll",
        default="all",
        choices=("none", "depth", "all"),
        help="with --layers stacked: layer scans to unroll in training (lm.*.scan_unroll)",
    )
    parser.add_argument("--dim", type=int, default=SEVEN_B_SHAPED["dim"])
    parser.add_argument("--num-heads", type=int, default=SEVEN_B_SHAPED["num_heads"])
    parser.add_argument("--num-layers", type=int, default=SEVEN_B_SHAPED["num_layers"])
    parser.add_argument("--depformer-dim", type=int, default=SEVEN_B_SHAPED["depformer_dim"])
    parser.add_argument(
        "--depformer-heads", type=int, default=SEVEN_B_SHAPED["depformer_num_heads"]
    )
    parser.add_argument(
        "--depformer-layers", type=int, default=SEVEN_B_SHAPED["depformer_num_layers"]
    )
    parser.add_argument("--text-card", type=int, default=SEVEN_B_SHAPED["text_card"])
    parser.add_argument("--context", type=int, default=SEVEN_B_SHAPED["context"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    kwargs = moshi_kwargs(args)
    tm = build_moshi_lm(kwargs)
    cfg = lm_config_from_moshi(kwargs)
    temporal = dataclasses.replace(
        cfg.temporal, remat=args.remat, scan_unroll=args.scan_unroll == "all"
    )
    depth = dataclasses.replace(cfg.depth, scan_unroll=args.scan_unroll != "none")
    cfg = dataclasses.replace(cfg, temporal=temporal, depth=depth)
    cfg = cfg.with_scan_layers(args.layers == "stacked")
    model = import_moshi_lm(numpy_state_dict(tm), cfg=cfg)

    env = environment(args.threads)
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    stream = streaming(tm, model, args.batch, args.frames, args.warmup, args.greedy)
    compiles = _step._cache_size()
    train = training(
        tm, model, kwargs, args.train_batch, args.train_frames, args.iters, args.rounds
    )
    env["load_average_end"] = os.getloadavg()
    print(f"load average at end: {env['load_average_end']}")
    print()
    t = cfg.temporal
    print(
        f"LM dim {t.dim} x {t.num_layers} layers, depformer {cfg.depth.dim} x "
        f"{cfg.depth.num_layers}, {cfg.n_streams} streams, card {cfg.card}, text card "
        f"{cfg.text_card}, float32."
    )
    mode = "greedy" if args.greedy else "sampling (top-k 250 / 25, temp 0.8 / 0.7)"
    print(
        f"Streaming: batch {args.batch}, {mode}, {args.frames} frames after {args.warmup} "
        f"(sfm step compiled {compiles} time(s))."
    )
    print(
        f"Training: batch {args.train_batch} x {args.train_frames} frames, median of "
        f"{args.rounds} x {args.iters} iterations, sfm remat {args.remat!r}, {_layout(cfg)}; "
        f"losses moshi {train['torch']['loss']:.4f}, sfm {train['sfm']['loss']:.4f}."
    )
    print()
    print(table(stream, train))
    step_ratio = stream["sfm"]["median"] / stream["torch"]["median"]
    train_ratio = train["sfm"]["frames_per_s"] / train["torch"]["frames_per_s"]
    print(f"\nstreaming step ratio sfm/torch (median ms): {step_ratio:.2f} (target <= 0.5)")
    print(f"training throughput ratio sfm/torch (frames/s): {train_ratio:.2f} (target >= 1.5)")
    per_round = " ".join(f"{r:.2f}" for r in train["rounds"]["ratios"])
    print(f"  per round: {per_round}")
    if args.json:
        result = {"environment": env, "args": vars(args) | {"json": str(args.json)}}
        result |= {"streaming_ms": stream, "training": train, "sfm_step_compiles": compiles}
        result |= {"streaming_step_ratio": step_ratio, "training_ratio": train_ratio}
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
