"""The LM train loop: sharded == single device, exact resume after SIGKILL, SIGTERM, bad
checkpoints, restore onto another mesh."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sfm.config import Config, load_config
from sfm.data.tokenize import write_shard
from sfm.testing.records import speech_record
from sfm.train.loop import train
from sfm.train.metrics import drop_steps_after, read_metrics

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "train" / "tiny_pretrain.yaml"
STEPS = 6


def _write_shard(path: Path, channels: int, n: int, seed: int) -> str:
    """n random tokenized records (tiny vocabularies of 64) in one ArrayRecord file."""
    rng = np.random.default_rng(seed)
    records = []
    for j in range(n):
        frames = int(rng.integers(40, 90))
        kw = {"n_q": 4, "card": 64, "text_vocab": 64, "p_pad": 0.4, "p_epad": 0.1}
        records.append(speech_record(rng, channels, frames, **kw, path=f"u{j}.wav"))
    return write_shard(path, records, "group_size:1")


@pytest.fixture(scope="module")
def overrides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("shards")
    mono = _write_shard(root / "speech-00000-of-00001.array_record", 1, 30, 0)
    duplex = _write_shard(root / "duplex-00000-of-00001.array_record", 2, 20, 1)
    return [
        f"data.speech_paths=[{mono}]",
        f"data.interleaved_paths=[{mono}]",
        f"data.duplex_paths=[{duplex}]",
        "data.weights=[0, 1, 1, 1]",
    ]


def _schedule(extra: tuple[str, ...]) -> list[str]:
    """STEPS steps with a checkpoint every 2, unless `extra` sets the schedule itself."""
    if any(e.startswith("train.steps=") for e in extra):
        return list(extra)
    return [f"train.steps={STEPS}", "train.ckpt_every=2", *extra]


def _config(overrides: list[str], out: Path, *extra: str) -> Config:
    return load_config(PRESET, [*overrides, f"train.out_dir={out}", *_schedule(extra)])


def _losses(out: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl, which logs each step once, in order (a resumed run
    drops the records of the steps it replays)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def _tensorboard_steps(log_dir: Path, tag: str) -> list[int]:
    """The steps of `tag` as TensorBoard shows them: event files in name (time) order, where a
    SessionLog START at step s (tensorboardX's purge_step) hides the events of steps >= s."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    steps: list[int] = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):  # TFRecords: length (u64), crc (u32), event, crc (u32)
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                steps = [s for s in steps if s < event.step]
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


@pytest.fixture(scope="module")
def reference(overrides: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run on (data, fsdp, tensor) = (2, 2, 2)."""
    out = tmp_path_factory.mktemp("reference")
    summary = train(
        _config(overrides, out, "mesh.ici_data=2", "mesh.ici_fsdp=2", "mesh.ici_tensor=2")
    )
    assert summary.first_step == 0 and summary.last_step == STEPS
    assert sorted(_losses(out)) == list(range(1, STEPS + 1))
    return out


# `python -m sfm.train ARGS` whose process reaches its first step `late_s` seconds late (as a
# host that compiles slower does): longer than gloo's ~30 s rendezvous.
LATE_TRAIN = """
import runpy, sys, time
import sfm.train.loop as loop
shard, late = loop.shard_batch, [{late_s}]
loop.shard_batch = lambda *a, **k: (time.sleep(late.pop() if late else 0), shard(*a, **k))[1]
sys.argv = ["sfm.train", *sys.argv[1:]]
runpy.run_module("sfm.train", run_name="__main__", alter_sys=True)
"""


def _spawn(
    overrides: list[str],
    out: Path,
    devices: int,
    *extra: str,
    env: dict[str, str] | None = None,
    late_s: float = 0.0,
) -> subprocess.Popen:
    """`python -m sfm.train` in a fresh process with `devices` simulated CPU devices."""
    env = {
        **os.environ,
        **(env or {}),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    args = [str(PRESET), *overrides, f"train.out_dir={out}", *_schedule(extra)]
    main = ["-c", LATE_TRAIN.format(late_s=late_s)] if late_s else ["-m", "sfm.train"]
    return subprocess.Popen(
        [sys.executable, *main, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_steps(out: Path, proc: subprocess.Popen, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"run did not reach step {n}: {proc.poll()=}")


def test_sharded_loss_equals_single_device(
    overrides: list[str], reference: Path, tmp_path: Path
) -> None:
    proc = _spawn(overrides, tmp_path, 1, "mesh.ici_data=1")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    single, sharded = _losses(tmp_path), _losses(reference)
    assert len(single) == STEPS >= 5
    np.testing.assert_allclose(
        [single[s] for s in single], [sharded[s] for s in single], rtol=0, atol=1e-5
    )


def test_kill9_then_resume_reproduces_losses_bit_for_bit(
    overrides: list[str], reference: Path, tmp_path: Path
) -> None:
    proc = _spawn(overrides, tmp_path, 8, "mesh.ici_data=2", "mesh.ici_fsdp=2", "mesh.ici_tensor=2")
    _wait_for_steps(tmp_path, proc, 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "checkpoints").exists()
    summary = train(
        _config(overrides, tmp_path, "mesh.ici_data=2", "mesh.ici_fsdp=2", "mesh.ici_tensor=2")
    )
    assert 0 < summary.first_step < STEPS, "the killed run left no checkpoint to resume from"
    assert _losses(tmp_path) == _losses(reference)  # exact float equality


def test_sigterm_saves_and_exits_cleanly(overrides: list[str], tmp_path: Path) -> None:
    proc = _spawn(overrides, tmp_path, 8, "train.steps=1000", "train.ckpt_every=1000")
    _wait_for_steps(tmp_path, proc, 2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "stopped by SIGTERM" in output
    last = max(_losses(tmp_path))
    assert last < 1000
    assert (tmp_path / "checkpoints" / str(last)).is_dir()


def test_unreadable_latest_checkpoint_falls_back_to_previous(
    overrides: list[str], reference: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    latest = run / "checkpoints" / str(STEPS)
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    mesh = ("mesh.ici_data=2", "mesh.ici_fsdp=2", "mesh.ici_tensor=2")
    with caplog.at_level(logging.WARNING, logger="sfm.train.checkpoint"):
        summary = train(_config(overrides, run, *mesh))
    assert summary.first_step == STEPS - 2
    assert any(f"/{STEPS} is unreadable" in r.getMessage() for r in caplog.records)
    assert _losses(run) == _losses(reference)


def test_resume_says_where_from_and_logs_replayed_steps_once(
    overrides: list[str], reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed after logging step STEPS, before its checkpoint was final: the rerun resumes at
    STEPS - 2, says so in one line, and steps STEPS - 1 and STEPS end up logged once."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / str(STEPS))
    capsys.readouterr()
    seen: list[dict[str, float]] = []  # what `on_step` (live curves) is given
    summary = train(
        _config(overrides, run, "mesh.ici_data=2", "mesh.ici_fsdp=2", "mesh.ici_tensor=2"),
        on_step=lambda step, metrics: seen.append({"step": step, **metrics}),
    )
    assert summary.first_step == STEPS - 2
    said = [line for line in capsys.readouterr().out.splitlines() if "resumed" in line]
    assert said == [f"resumed from {run / 'checkpoints'} at step {STEPS - 2}"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert seen == logged[-2:]  # the steps run, with exactly what metrics.jsonl records
    assert _losses(run) == _losses(reference)
    assert _tensorboard_steps(run / "tensorboard", "train/loss") == list(range(1, STEPS + 1))


def test_drop_steps_after_keeps_the_restored_steps(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)]
    metrics.write_text("".join(rows) + '{"step": 8, "lo')  # the kill cut step 8's record
    assert drop_steps_after(metrics, 4) == 4
    assert metrics.read_text() == "".join(rows[:4])
    assert drop_steps_after(metrics, 4) == 0
    assert drop_steps_after(tmp_path / "absent.jsonl", 4) == 0
    assert drop_steps_after(metrics, 0) == 4
    assert metrics.read_text() == ""


def test_read_metrics_leaves_out_a_line_cut_short(tmp_path: Path) -> None:
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert read_metrics(tmp_path / "absent") == []


def test_restore_onto_a_different_mesh(
    overrides: list[str], reference: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / str(STEPS))
    summary = train(_config(overrides, run, "mesh.ici_data=1", "mesh.ici_fsdp=8"))
    assert summary.first_step == STEPS - 2
    resumed, ref = _losses(run), _losses(reference)
    np.testing.assert_allclose([resumed[s] for s in ref], [ref[s] for s in ref], rtol=0, atol=1e-5)


def test_two_hosts_match_one_host(overrides: list[str], reference: Path, tmp_path: Path) -> None:
    """2 processes x 4 devices (jax.distributed on localhost) == 1 process x 8 devices, with
    the second process reaching its first step 40 s after the first."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mesh = ("mesh.ici_data=2", "mesh.ici_fsdp=2", "mesh.ici_tensor=2")
    procs = [
        _spawn(
            overrides,
            tmp_path,
            4,
            *mesh,
            env={
                "SFM_COORDINATOR": f"127.0.0.1:{port}",
                "SFM_NUM_PROCESSES": "2",
                "SFM_PROCESS_ID": str(i),
            },
            late_s=40.0 * i,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "global batch 8 (4 rows on each of 2 hosts, 8 devices)" in outputs[0]
    two, one = _losses(tmp_path), _losses(reference)
    assert sorted(two) == sorted(one)
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=0, atol=1e-5)
