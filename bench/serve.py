"""Load test of `sfm serve`: many users talking at once, in real time, for a minute.

Starts `sfm serve --config CONFIG --slots USERS` on a free loopback port, waits for
/healthz, then runs `sfm.testing.load.run_load` (USERS simulated users in real time,
reconnecting after each turn, a third of the turns cut off abruptly, a quarter sending
malformed messages). Prints the users' lag percentiles (model audio arrival minus the send
time of the user audio of the same instant), the server's step time against the frame
duration, underruns, dropped messages, the most frames a user's audio waited beyond the
jitter buffer (sfm_frames_behind, polled), free slots at the end and the server's memory
before and after; "real time kept" means 99% of the steps finished within a frame and the
users' lag p99 stayed under 200 ms.

    PYTHONPATH=. .venv/bin/python bench/serve.py [--users 16] [--seconds 60] [--config tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from sfm.config import load_config, resolve_preset
from sfm.testing.load import LoadReport, run_load

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def _metrics(base: str) -> dict[str, float]:
    """Prometheus samples by name (labelled ones summed), `le` buckets kept apart."""
    out: dict[str, float] = {}
    for line in _get(f"{base}/metrics").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        if "_bucket" not in name:
            name = name.split("{")[0]
        out[name] = out.get(name, 0.0) + float(value)
    return out


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _load_and_watch(
    base: str, url: str, users: int, seconds: float
) -> tuple[LoadReport, float]:
    """The load, and the most user frames waiting at the server (polled every 0.5 s)."""
    load = asyncio.create_task(run_load(url, users, seconds, seed=2))
    behind = 0.0
    while not load.done():
        metrics = await asyncio.to_thread(_metrics, base)
        behind = max(behind, metrics["sfm_frames_behind"])
        await asyncio.sleep(0.5)
    return await load, behind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--config", default="tiny", help="lm preset (random weights)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sfm", "serve", "--config", args.config]
    cmd += ["--slots", str(args.users), "--port", str(port)]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="sfm-serve-")
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while True:
            try:
                if _get(f"{base}/healthz") == "ok":
                    break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start: {Path(log.name).read_text()[-2000:]}")
            time.sleep(1)
        url = f"ws://127.0.0.1:{port}/api/chat"
        asyncio.run(run_load(url, args.users, 5.0, seed=1, turn_s=(1.0, 2.0)))  # warm
        rss0, before = _rss_mib(server.pid), _metrics(base)
        report, behind = asyncio.run(_load_and_watch(base, url, args.users, args.seconds))
        time.sleep(1.0)
        rss1, after = _rss_mib(server.pid), _metrics(base)
    finally:
        server.terminate()
        server.wait(30)
    codec = load_config(resolve_preset(args.config, "lm")).codec
    frame_s = codec.frame_size / codec.sample_rate
    steps = after["sfm_frame_latency_seconds_count"] - before["sfm_frame_latency_seconds_count"]
    le = f'sfm_frame_latency_seconds_bucket{{le="{frame_s:g}"}}'
    within = (after[le] - before[le]) / max(steps, 1)
    step_s = after["sfm_frame_latency_seconds_sum"] - before["sfm_frame_latency_seconds_sum"]
    result = {
        "users": args.users,
        "seconds": args.seconds,
        "config": args.config,
        "cpu_count": os.cpu_count(),
        "turns": report.turns,
        "aborted": report.aborted,
        "refused": report.refused,
        "errors": report.errors[:5],
        "lag_ms": report.percentiles(),
        "steps": steps,
        "mean_step_ms": 1e3 * step_s / max(steps, 1),
        "steps_within_a_frame": within,
        "underruns": after["sfm_underruns_total"] - before["sfm_underruns_total"],
        "malformed_dropped": after["sfm_malformed_messages_total"]
        - before["sfm_malformed_messages_total"],
        "malformed_sent": report.malformed_sent,
        "max_frames_behind": behind,
        "free_slots_at_end": after["sfm_free_slots"],
        "server_rss_mib": [round(rss0, 1), round(rss1, 1)],
    }
    result["real_time_kept"] = within >= 0.99 and result["lag_ms"].get("p99", 1e9) < 200
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
