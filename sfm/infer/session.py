"""One conversation on `sfm serve`: its audio in and out, what its query asked for, and the
server's Prometheus metrics.

A session's user audio waits in `pending` until the engine takes it a frame at a time; what
the model says goes into `outbox`, which a task of its own writes to the socket, so a client
that stops reading fills only its own queue (and is closed when that is full) instead of
holding up the engine's step for everyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import Mapping

import jax
import numpy as np
import sphn
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sfm.infer.engine import SessionSampling

log = logging.getLogger("sfm.serve")
MAX_REASON = 120  # bytes of a WebSocket close reason (the protocol allows 123)
OPUS_SLICE = 4096  # bytes decoded per call: sphn refuses more than 5 s of audio at once
# Query parameters of Moshi's clients -> SessionSampling fields.
SAMPLING_PARAMS: dict[str, tuple[str, type]] = {
    "text_temperature": ("temp_text", float),
    "text_topk": ("top_k_text", int),
    "audio_temperature": ("temp", float),
    "audio_topk": ("top_k", int),
}
_INT_MAX = 2**31 - 1


class Metrics:
    """The server's metrics, in a registry of their own (several servers per process)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.sessions = Gauge("sfm_sessions_active", "Conversations connected", registry=r)
        self.free = Gauge("sfm_free_slots", "Engine slots free", registry=r)
        self.latency = Histogram(
            "sfm_frame_latency_seconds",
            "Wall time of one engine step (all slots)",
            buckets=(0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.2, 0.5, 1.0),
            registry=r,
        )
        self.behind = Gauge(
            "sfm_frames_behind",
            "Most user frames a session has waiting beyond its jitter buffer",
            registry=r,
        )
        self.underruns = Counter(
            "sfm_underruns", "Frames a started session's audio was late", registry=r
        )
        self.step_errors = Counter("sfm_step_errors", "Engine steps that raised", registry=r)
        self.malformed = Counter(
            "sfm_malformed_messages", "Client messages dropped", ["kind"], registry=r
        )


@dataclasses.dataclass(eq=False)
class Session:
    slot: int
    ws: web.WebSocketResponse
    key: jax.Array | None
    sampling: SessionSampling
    outbox: asyncio.Queue[bytes]
    reader: sphn.OpusStreamReader
    writer: sphn.OpusStreamWriter
    pending: list[np.ndarray] = dataclasses.field(default_factory=list)
    buffered: int = 0  # samples in `pending`
    started: bool = False
    malformed: int = 0

    def hear(self, opus: bytes) -> int:
        """Decode Ogg/Opus bytes into `pending`; the samples added. ValueError if undecodable."""
        added = 0
        for i in range(0, len(opus), OPUS_SLICE):
            pcm = np.asarray(self.reader.append_bytes(opus[i : i + OPUS_SLICE]), np.float32)
            if pcm.size:
                self.pending.append(pcm)
                added += pcm.size
        self.buffered += added
        return added

    def take(self, n: int) -> np.ndarray:
        """The oldest `n` buffered samples."""
        pcm = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.pending = [pcm[n:]] if pcm.size > n else []
        self.buffered = pcm.size - n
        return pcm[:n]

    def send(self, message: bytes) -> bool:
        """Queue a message for the client; False when its queue is full (it stopped reading)."""
        try:
            self.outbox.put_nowait(message)
            return True
        except asyncio.QueueFull:
            return False

    async def write(self) -> None:
        """Write the queued messages to the socket until cancelled or the client is gone."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                await self.ws.send_bytes(await self.outbox.get())


async def close(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    """Close with `reason` cut to what a close frame holds."""
    await ws.close(code=code, message=reason.encode()[:MAX_REASON])


def session_sampling(query: Mapping[str, str]) -> SessionSampling:
    """The session's sampling from Moshi's query parameters (unset ones: the engine's);
    ValueError naming the parameter."""
    given: dict[str, float | int] = {}
    for param, (field, kind) in SAMPLING_PARAMS.items():
        if param not in query:
            continue
        try:
            value = kind(query[param])
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"{param}: {query[param][:40]!r} is not {what}") from None
        if not (math.isfinite(value) and 0 <= value <= _INT_MAX):
            raise ValueError(f"{param}: must be a finite number >= 0, got {value:.6g}")
        given[field] = value
    return SessionSampling(**given)


def session_key(seed: str | None) -> jax.Array | None:
    """The sampling key of `?seed=` (None: the engine picks a new one)."""
    if seed is None:
        return None
    try:
        value = int(seed)
    except ValueError:
        raise ValueError(f"seed: {seed[:40]!r} is not an integer") from None
    if not 0 <= value < 2**32:
        raise ValueError(f"seed: must lie in [0, 2**32), got {value:.6g}")
    return jax.random.key(value)
