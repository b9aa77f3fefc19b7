"""What a run reports: TensorBoard scalars, a progress line with ETA, tokens/s and MFU.

MFU is model FLOPs utilisation: analytic training FLOPs per step (forward + backward =
3 x forward, 2 FLOPs per multiply-add) over the wall time, divided by the devices' peak.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from sfm.lm.config import LMConfig

# Dense bf16 peak FLOP/s per device, by jax device_kind prefix (public spec sheets).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def _matmul_params(dim: int, heads: int, kv_heads: int, hidden: int) -> int:
    """Weights one token multiplies through in a transformer layer (attention + gated MLP)."""
    head_dim = dim // heads
    return dim * (heads + 2 * kv_heads) * head_dim + dim * dim + 3 * dim * hidden


def lm_train_flops_per_frame(cfg: LMConfig, seq_len: int) -> float:
    """Training FLOPs per frame: matmuls of both transformers, heads and attention scores."""
    t, d = cfg.temporal, cfg.depth
    temporal = t.num_layers * _matmul_params(t.dim, t.num_heads, t.kv_heads, t.hidden)
    temporal += t.dim * cfg.text_card
    attn = t.num_layers * 2 * t.dim * min(seq_len, t.context)  # q.k and p.v, causal ~ half
    steps = cfg.dep_q
    depth = steps * (d.num_layers * _matmul_params(d.dim, d.num_heads, d.kv_heads, d.hidden))
    depth += steps * (t.dim * d.dim + d.dim * cfg.card)
    if d.kind == "csm":
        depth = depth / d.amortize_every + t.dim * cfg.card
    return 3 * 2 * (temporal + attn + depth)


def peak_flops(devices: list[Any] | None = None) -> float | None:
    """Sum of the devices' peak FLOP/s, None when their kind is not in the table (CPU)."""
    devices = devices or jax.devices()
    total = 0.0
    for dev in devices:
        peak = next((v for k, v in PEAK_FLOPS.items() if dev.device_kind.startswith(k)), None)
        if peak is None:
            return None
        total += peak
    return total


def _records(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of each whole line of a metrics.jsonl; a line cut short by a kill is
    left out."""
    rows = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # cut short by the kill
            continue
        if isinstance(record, dict):
            rows.append((line, record))
    return rows


def read_metrics(run: Path) -> list[dict[str, float]]:
    """The records of a run's metrics.jsonl, one per step, in order (none before its first)."""
    path = Path(run) / "metrics.jsonl"
    return [record for _, record in _records(path.read_text())] if path.is_file() else []


def drop_steps_after(path: Path, step: int) -> int:
    """Keep the records of `path` (metrics.jsonl) up to `step`; returns how many were dropped.

    A run resumed from the checkpoint of `step` replays the steps after it, so their records
    from before the kill would otherwise be logged twice. A line cut short by the kill goes too.
    """
    if not path.exists():
        return 0
    text = path.read_text()
    kept = [line + "\n" for line, record in _records(text) if record.get("step", 0) <= step]
    if "".join(kept) != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return len(text.splitlines()) - len(kept)


class Reporter:
    """TensorBoard writer (process 0) plus a progress bar with ETA, frames/s and MFU.

    Steps are logged from `first_step + 1`; TensorBoard hides the run's earlier events of
    those steps (a resumed run replays the steps after its checkpoint).
    """

    def __init__(
        self,
        log_dir: Path,
        first_step: int,
        steps: int,
        frames_per_step: int,
        flops_per_step: float,
    ) -> None:
        self.frames_per_step, self.flops_per_step = frames_per_step, flops_per_step
        self.peak = peak_flops()
        self.main = jax.process_index() == 0
        self.writer = None
        if self.main:
            from tensorboardX import SummaryWriter

            earlier = log_dir.is_dir() and any(log_dir.iterdir())
            purge_step = first_step + 1 if earlier else None
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self.bar = tqdm(
            total=steps, initial=first_step, disable=not self.main, unit="step", dynamic_ncols=True
        )
        self._last = time.perf_counter()

    def step(self, step: int, values: dict[str, float]) -> None:
        """Record one finished step's metrics."""
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        rates = {"perf/frames_per_s": self.frames_per_step / max(seconds, 1e-9)}
        if self.peak:
            rates["perf/mfu"] = self.flops_per_step / max(seconds, 1e-9) / self.peak
        if self.writer is not None:
            for k, v in {**values, **rates}.items():
                self.writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
        postfix = {"loss": f"{values['loss']:.3f}", "frames/s": f"{rates['perf/frames_per_s']:.0f}"}
        if "perf/mfu" in rates:
            postfix["mfu"] = f"{rates['perf/mfu']:.1%}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
