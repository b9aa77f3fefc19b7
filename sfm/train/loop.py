"""`sfm train`: the training loop shared by every task (see sfm.train.tasks).

Read top to bottom: mesh -> the task's model -> sharded train state -> the task's data ->
restore the newest checkpoint -> steps -> checkpoints -> export of the trained weights.
SIGTERM finishes the current step, saves and exits; after SIGKILL a rerun resumes from the
last checkpoint and reproduces the uninterrupted run's losses bit for bit (the step's PRNG
key is derived from the step number and the data iterator is restored with the model). A
resumed run prints where it resumed from and logs the steps it replays once (it drops their
earlier records from metrics.jsonl and hides their earlier TensorBoard events).
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from sfm.config import Config, dump_yaml
from sfm.parallel.distributed import barrier, initialize_from_env
from sfm.parallel.mesh import build_mesh
from sfm.parallel.rules import check_global_batch
from sfm.train import checkpoint as ckpt
from sfm.train.errors import TrainingStopped
from sfm.train.metrics import Reporter, drop_steps_after
from sfm.train.step import build_train_step, make_optimizer, shard_batch, split_model
from sfm.train.tasks import get_task

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a call to `train` did."""

    out_dir: Path
    first_step: int
    last_step: int
    losses: list[float] = field(default_factory=list)
    stopped_by_signal: bool = False
    seconds: float = 0.0
    export: Path | None = None  # the trained weights, written when the run completes
    global_batch: int = 0  # rows of each step's (sharded, global) batch

    def line(self) -> str:
        """One-line report for the command line."""
        how = "stopped by SIGTERM" if self.stopped_by_signal else "done"
        last = f", last loss {self.losses[-1]:.4f}" if self.losses else ""
        batch = f", global batch {self.global_batch}" if self.global_batch else ""
        return (
            f"{self.out_dir}: steps {self.first_step}..{self.last_step} {how}{last}{batch} "
            f"in {self.seconds:.1f} s"
        )


class _SigtermFlag:
    """Set by SIGTERM; the loop checks it between steps."""

    def __init__(self) -> None:
        self.set = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM: finishing this step, saving a checkpoint, then exiting")
        self.set = True

    def agreed(self) -> bool:
        """Whether any process got SIGTERM. Every process gets the same answer at the same
        step (an all-gather when there are several), so all save that step and stop; a pod's
        hosts are signalled at slightly different times."""
        if jax.process_count() == 1:
            return self.set
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.set))))

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def train(
    cfg: Config, on_step: Callable[[int, dict[str, float]], object] | None = None
) -> RunSummary:
    """Run (or resume) the training described by `cfg`; returns a summary. `on_step(step,
    metrics)` is called after every step with what metrics.jsonl records (e.g. to draw live
    loss curves in a notebook)."""
    t0 = time.perf_counter()
    initialize_from_env()
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (out / "config.yaml").write_text(dump_yaml(cfg))
    mesh, rules = build_mesh(cfg.mesh), cfg.mesh.rules
    check_global_batch(cfg.data.batch_size, mesh, rules)
    tx = make_optimizer(cfg.train.optim, cfg.train.steps)
    task = get_task(cfg)
    parts = split_model(
        task.build_model(cfg), task.trainable(cfg), tx, mesh, rules, task.mutable(cfg)
    )
    step_fn = build_train_step(parts, task.loss_fn(cfg), cfg.train)
    iterator = iter(task.dataset(cfg))
    mgr = ckpt.manager(
        out / "checkpoints", cfg.train.ckpt_every, cfg.train.keep, cfg.train.async_checkpoint
    )
    state = {
        "params": parts.params,
        "mutable": parts.mutable,
        "frozen": parts.frozen,
        "opt_state": parts.opt_state,
    }
    restored = ckpt.restore_latest(mgr, state, iterator)
    start = 0
    if restored is not None:
        start, state = restored
        if jax.process_index() == 0:
            print(f"resumed from {out / 'checkpoints'} at step {start}", flush=True)
    if jax.process_index() == 0:  # the steps after `start` run again: log them once
        drop_steps_after(out / "metrics.jsonl", start)
    summary = RunSummary(out, start, start)
    saved = start
    frames, flops = task.cost(cfg)
    reporter = Reporter(out / "tensorboard", start, cfg.train.steps, frames, flops)
    sigterm = _SigtermFlag()
    key = jax.random.key(cfg.seed)
    hook = getattr(task, "log_samples", None)  # optional: audio and images to TensorBoard
    try:
        with (out / "metrics.jsonl").open("a") as metrics_file:
            for step in range(start, cfg.train.steps):
                batch = shard_batch(task.device_batch(next(iterator)), mesh, rules)
                if not summary.global_batch:
                    summary.global_batch = _announce(cfg, batch)
                args = (
                    state["params"],
                    state["mutable"],
                    state["frozen"],
                    state["opt_state"],
                    batch,
                    jax.random.fold_in(key, step),
                )
                if step == start:  # every process compiles, then all run the first step together
                    step_fn.lower(*args).compile()
                    barrier("sfm_train_compiled")
                params, mutable, opt_state, metrics = step_fn(*args)
                state = {**state, "params": params, "mutable": mutable, "opt_state": opt_state}
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                _check_finite(values, step, cfg)
                summary.losses.append(values["loss"])
                summary.last_step = step + 1
                if jax.process_index() == 0:
                    metrics_file.write(json.dumps({"step": step + 1, **values}) + "\n")
                    metrics_file.flush()
                reporter.step(step + 1, values)
                if on_step is not None:
                    on_step(step + 1, values)
                if hook and (step + 1) % (cfg.train.log_every * 10) == 0:  # every process
                    merged = (state["params"], state["mutable"], state["frozen"])
                    hook(reporter.writer, step + 1, nnx.merge(parts.graphdef, *merged), batch)
                if (step + 1) % cfg.train.log_every == 0:
                    log.info("step %d loss %.4f", step + 1, values["loss"])
                stop = sigterm.agreed()
                if ckpt.save(mgr, step + 1, state, iterator, force=stop):
                    saved = step + 1
                if stop:
                    summary.stopped_by_signal = True
                    break
        if saved != summary.last_step:
            ckpt.save(mgr, summary.last_step, state, iterator, force=True)
        mgr.wait_until_finished()
        if summary.last_step == cfg.train.steps:
            merged = (state["params"], state["mutable"], state["frozen"])
            summary.export = task.export(cfg, nnx.merge(parts.graphdef, *_on_host(merged)), out)
    finally:
        reporter.close()
        sigterm.restore()
        mgr.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _on_host(tree: Any) -> Any:
    """`tree` with every array whole in this process's memory: a pod's arrays span hosts, and
    the export reads them on one. Arrays are all-gathered in the same order on every process,
    a stacked array one layer at a time (a 7B MLP stack is ~18 GB, more than a chip holds)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    def whole(x: jax.Array) -> np.ndarray:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def gather(x: Any) -> Any:
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = whole(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        if x.ndim >= 3 and x.shape[0] > 1:  # [layers, ...]
            return np.stack([whole(x[i]) for i in range(x.shape[0])])
        return whole(x)

    return jax.tree.map(gather, tree)


def _announce(cfg: Config, batch: dict[str, jax.Array]) -> int:
    """Print (process 0) and return the global batch the steps take: `data.batch_size` rows,
    each host reading its share, as `sfm compile` assumes."""
    rows = {x.shape[0] for x in batch.values()}
    if rows != {cfg.data.batch_size}:
        raise RuntimeError(
            f"global batch of {sorted(rows)} rows for data.batch_size={cfg.data.batch_size}"
        )
    hosts = jax.process_count()
    if jax.process_index() == 0:
        print(
            f"global batch {cfg.data.batch_size} ({cfg.data.batch_size // hosts} rows on each of "
            f"{hosts} host{'s' * (hosts > 1)}, {jax.device_count()} devices)",
            flush=True,
        )
    return cfg.data.batch_size


def _check_finite(values: dict[str, float], step: int, cfg: Config) -> None:
    """Stop (or, with nan_policy "skip", log) on a non-finite loss or gradient norm."""
    if values["finite"]:
        return
    what = f"step {step + 1}: loss {values['loss']}, gradient norm {values['grad_norm']}"
    if cfg.train.nan_policy == "stop":
        raise TrainingStopped(
            f"non-finite {what}; stopping (train.nan_policy=skip skips such steps)"
        )
    log.warning("non-finite %s; update skipped", what)
