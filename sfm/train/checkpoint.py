"""Orbax checkpoints of a run: trainable params, frozen state, optimizer state, data iterator.

Saves are asynchronous every `ckpt_every` steps, the last `keep` are kept. Orbax finalises a
step directory only when every file is written, so a save cut short leaves no step behind. A
finalised step that cannot be read (truncated or corrupted files) is reported in one log line,
renamed `<step>.unreadable-<time>` (kept for inspection, out of the way of new saves), and the
previous step is restored instead. Restoring builds abstract targets with the current mesh's
shardings, so a run may resume on a different mesh shape.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sfm.io.tensors import CheckpointError

log = logging.getLogger(__name__)


def manager(
    directory: str | Path, every: int, keep: int, async_save: bool
) -> ocp.CheckpointManager:
    """A CheckpointManager for items "state" (pytree) and "data" (grain iterator)."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every,
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(
        Path(directory).absolute(), options=options, item_names=("state", "data")
    )


def save(
    mgr: ocp.CheckpointManager, step: int, state: Any, iterator: Any, force: bool = False
) -> bool:
    """Save when the interval says so (or `force`); returns whether a save started."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)
    )
    return mgr.save(step, args=args, force=force)


def _abstract(state: Any) -> Any:
    """ShapeDtypeStructs carrying each leaf's sharding: the restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def restore_latest(mgr: ocp.CheckpointManager, state: Any, iterator: Any) -> tuple[int, Any] | None:
    """(step, state) of the newest readable checkpoint, the iterator restored in place;
    None when the run has no checkpoint. Unreadable steps are skipped with a log line."""
    steps = sorted(mgr.all_steps(), reverse=True)
    if not steps:
        return None
    target = _abstract(state)
    for i, step in enumerate(steps):
        try:
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=grain.checkpoint.CheckpointRestore(iterator),
            )
            restored = mgr.restore(step, args=args)
            if i:
                _set_aside(mgr, steps[:i])
            return step, restored["state"]
        except Exception as err:  # any unreadable file: fall back to an older step
            older = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "none left"
            log.warning(
                "checkpoint %s/%d is unreadable (%s: %s); %s",
                mgr.directory,
                step,
                type(err).__name__,
                str(err).splitlines()[0][:200] if str(err) else "",
                older,
            )
    raise CheckpointError(f"{mgr.directory}: no readable checkpoint among steps {steps}")


def _set_aside(mgr: ocp.CheckpointManager, steps: list[int]) -> None:
    """Rename unreadable steps to `<step>.unreadable` so new saves of those steps succeed."""
    if jax.process_index() == 0:
        for step in steps:
            path = Path(mgr.directory) / str(step)
            path.rename(path.with_name(f"{step}.unreadable-{int(time.time())}"))
    multihost_utils.sync_global_devices("sfm_checkpoint_set_aside")
    mgr.reload()
