"""A load generator for `sfm serve`: many simulated users talking at once, in real time.

Each of `sessions` users talks in turns of a few seconds (80 ms Opus pages sent on the
clock, as a microphone would) for `seconds` in all, reconnecting after each turn. Every
third turn ends abruptly (the socket shut, no close frame); every fourth sends malformed
messages halfway (a text frame, an unknown kind, client text). A refused connection (all
slots busy) is retried. Lag is measured per received model audio message: its arrival time
minus the time the user audio of the same instant was sent (one model frame per user frame),
so it holds the network, Opus buffering, queueing and the engine step.

Used by tests/test_serve.py (short) and bench/serve.py (16 users x 60 s).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time

import aiohttp
import numpy as np
import sphn

from sfm.testing.audio import gliding_tone

RATE, PAGE = 24000, 1920


@dataclasses.dataclass
class LoadReport:
    turns: int = 0
    aborted: int = 0
    malformed_sent: int = 0
    refused: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    lag_ms: list[float] = dataclasses.field(default_factory=list)

    def percentiles(self) -> dict[str, float]:
        if not self.lag_ms:
            return {}
        p50, p95, p99 = np.percentile(np.asarray(self.lag_ms), [50, 95, 99])
        return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


async def _turn(
    http: aiohttp.ClientSession,
    url: str,
    report: LoadReport,
    rng: np.random.Generator,
    abort: bool,
    malformed: bool,
    turn_s: tuple[float, float],
) -> None:
    pages = int(rng.uniform(*turn_s) * RATE / PAGE)
    user = gliding_tone(pages * PAGE, rng)
    ws = await http.ws_connect(url)
    first = await ws.receive(timeout=30)
    if first.type != aiohttp.WSMsgType.BINARY:
        report.refused += 1
        await ws.close()
        await asyncio.sleep(0.2)
        return
    report.turns += 1
    writer, reader = sphn.OpusStreamWriter(RATE), sphn.OpusStreamReader(RATE)
    start = time.perf_counter()
    stop_at = pages // 2 if abort else pages

    async def send() -> None:
        for i in range(stop_at):
            opus = writer.append_pcm(user[i * PAGE : (i + 1) * PAGE])
            if opus:
                await ws.send_bytes(b"\x01" + opus)
            if malformed and i == pages // 2:
                await ws.send_str("not binary")
                await ws.send_bytes(b"\x09?")
                await ws.send_bytes(b"\x02client text")
                report.malformed_sent += 3
            await asyncio.sleep(max(0.0, start + (i + 1) * PAGE / RATE - time.perf_counter()))

    async def receive() -> None:
        received = 0
        while received < stop_at * PAGE:
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise RuntimeError(f"closed by the server: {msg.extra or ws.close_code}")
            if msg.data[:1] == b"\x01":
                received += reader.append_bytes(msg.data[1:]).size
                report.lag_ms.append(1e3 * (time.perf_counter() - start - received / RATE))

    sender = asyncio.create_task(send())
    try:
        await asyncio.wait_for(receive(), timeout=stop_at * PAGE / RATE + 30)
    finally:
        sender.cancel()
    if abort:  # no close frame: the server sees the connection drop
        sock = ws.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)
        report.aborted += 1
    await ws.close()


async def run_load(
    url: str,
    sessions: int,
    seconds: float,
    seed: int = 0,
    turn_s: tuple[float, float] = (2.0, 5.0),
) -> LoadReport:
    """`sessions` users against the server at `url` (its /api/chat, token included) for
    `seconds`; errors of a user are recorded, not raised."""
    report, deadline = LoadReport(), time.perf_counter() + seconds

    async def user(i: int) -> None:
        rng, n = np.random.default_rng([seed, i]), 0
        async with aiohttp.ClientSession() as http:
            while time.perf_counter() < deadline:
                n += 1
                abort, malformed = (i + n) % 3 == 0, (i + n) % 4 == 0
                try:
                    await _turn(http, url, report, rng, abort, malformed, turn_s)
                except (aiohttp.ClientError, RuntimeError, TimeoutError, OSError) as err:
                    report.errors.append(f"user {i} turn {n}: {type(err).__name__}: {err}")

    await asyncio.gather(*(user(i) for i in range(sessions)))
    return report
