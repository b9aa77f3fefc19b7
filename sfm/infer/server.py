"""`sfm serve`: Moshi's WebSocket protocol over the engine, many conversations at once.

    GET /           the web page (static/: microphone in, the model's voice out, its text)
    GET /api/chat   WebSocket; binary messages, the first byte their kind (Moshi's protocol):
                    server -> 0x00 when the session is ready; 0x01 + Ogg/Opus (24 kHz mono)
                    both ways; server -> 0x02 + UTF-8, the model's text pieces.
                    Query: `seed` (the session's sampling key; default a new one per session),
                    moshi's `text_temperature`, `text_topk`, `audio_temperature`, `audio_topk`
                    (the session's own; top-k at most the server's), `token` if it has one.
    GET /healthz    200 once the engine's step is compiled, 503 before
    GET /metrics    Prometheus text: sessions, free slots, frame latency, frames behind real
                    time, underruns, malformed messages by kind

Each connection holds one engine slot; when all are busy the client is closed with code 1013
and the reason. One task drives the engine on a clock, one step per frame (80 ms for Mimi)
for all sessions. A session starts (its slot reset with its key) once a frame plus
`serve.jitter_buffer_s` of its audio has arrived, so what it hears before that cannot change
what it says and network jitter up to that much costs nothing; a started session whose audio
is late hears silence for that frame (an underrun). Engine calls run one at a time in a
worker thread, so the event loop keeps reading every client while the step computes.

A malformed message (text frame, empty, unknown kind, client text, oversize) is logged on
one line, counted and dropped; undecodable Opus, an idle client, or one further ahead than
`serve.max_buffer_s` is closed with a reason. A disconnect, clean or not, frees the slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import sphn
from aiohttp import WSCloseCode, WSMsgType, web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sfm.errors import ConfigError
from sfm.infer.config import LOOPBACK, ServeConfig
from sfm.infer.engine import Engine, Frame, SessionSampling

log = logging.getLogger("sfm.serve")
HANDSHAKE, AUDIO, TEXT = 0, 1, 2
TOKEN_ENV = "SFM_SERVE_TOKEN"
STATIC = Path(__file__).parent / "static"  # the web page
MAX_DEBT = 4  # frames a late step may be behind the clock before the lag is forgiven
T = TypeVar("T")


class _Metrics:
    def __init__(self, slots: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("sfm_sessions_active", "Conversations connected", registry=r)
        self.free = Gauge("sfm_free_slots", "Engine slots free", registry=r)
        self.free.set(slots)
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
        self.malformed = Counter(
            "sfm_malformed_messages", "Client messages dropped", ["kind"], registry=r
        )


@dataclasses.dataclass(eq=False)
class _Session:
    slot: int
    ws: web.WebSocketResponse
    key: jax.Array | None
    sampling: SessionSampling
    reader: sphn.OpusStreamReader
    writer: sphn.OpusStreamWriter
    pending: list[np.ndarray] = dataclasses.field(default_factory=list)
    buffered: int = 0  # samples in `pending`
    started: bool = False
    sent_frames: int = 0

    def take(self, n: int) -> np.ndarray:
        """The oldest `n` buffered samples."""
        pcm = np.concatenate(self.pending)
        self.pending = [pcm[n:]] if pcm.size > n else []
        self.buffered = pcm.size - n
        return pcm[:n]


class Server:
    """The WebSocket server over `engine`; `pieces` names the text tokens (moshi sends the
    tokenizer's pieces with the word marker as a space), `pad_ids` are never sent."""

    def __init__(
        self,
        engine: Engine,
        cfg: ServeConfig,
        pieces: Sequence[str] | None = None,
        pad_ids: Sequence[int] = (),
    ) -> None:
        self.engine, self.cfg = engine, cfg
        self.token = cfg.token or os.environ.get(TOKEN_ENV, "")
        if cfg.host not in LOOPBACK and not self.token:
            raise ConfigError(
                f"serve.host: {cfg.host} is not loopback; set serve.token or ${TOKEN_ENV}"
            )
        self.pieces, self.pad_ids = pieces, frozenset(pad_ids)
        self.metrics = _Metrics(engine.slots)
        self.ready = False
        self.sessions: dict[int, _Session] = {}
        self._lock = asyncio.Lock()  # one engine call at a time
        self._wake = asyncio.Event()
        self._frame_s = engine.frame_size / engine.sample_rate
        self._jitter_samples = int(cfg.jitter_buffer_s * engine.sample_rate)

    # ------------------------------------------------------------------ app

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/chat.js", self._page)
        app.router.add_get("/api/chat", self._chat)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._driver = asyncio.create_task(self._drive())

    async def _on_cleanup(self, app: web.Application) -> None:
        self._driver.cancel()

    async def _engine(self, fn: Callable[..., T], *args: Any) -> T:
        """An engine call in the worker thread, after any other has finished."""
        async with self._lock:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def _authorized(self, request: web.Request) -> bool:
        if not self.token:
            return True
        header = request.headers.get("Authorization", "")
        given = request.query.get("token") or header.removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def _page(self, request: web.Request) -> web.FileResponse:
        """The web page (and its script): the query string carries the token to /api/chat."""
        return web.FileResponse(
            STATIC / ("chat.js" if request.path == "/chat.js" else "index.html")
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        if self.ready:
            return web.Response(text="ok")
        return web.Response(status=503, text="warming up")

    async def _metrics(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            raise web.HTTPUnauthorized(text="a token is required")
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    # ------------------------------------------------------------------ a conversation

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            raise web.HTTPUnauthorized(text="a token is required")
        ws = web.WebSocketResponse(max_msg_size=self.cfg.max_message_bytes)
        await ws.prepare(request)
        peer = request.remote
        try:
            key = _session_key(request.query.get("seed"))
            sampling = _session_sampling(request.query)
        except ValueError as err:
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=str(err).encode())
            return ws
        try:
            if not self.ready:
                raise RuntimeError("warming up")
            slot = await self._engine(self.engine.join, key, sampling)
        except RuntimeError as err:  # warming up, or every slot busy
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=str(err).encode())
            return ws
        rate = self.engine.sample_rate
        reader, writer = sphn.OpusStreamReader(rate), sphn.OpusStreamWriter(rate)
        session = _Session(slot, ws, key, sampling, reader, writer)
        self.sessions[slot] = session
        self._update_gauges()
        log.info("%s: session in slot %d", peer, slot)
        try:
            await ws.send_bytes(bytes([HANDSHAKE]))
            await self._receive(session, peer)
        finally:
            del self.sessions[slot]
            await self._engine(self.engine.leave, slot)
            self._update_gauges()
            if not ws.closed:
                await ws.close()
            log.info("%s: slot %d free", peer, slot)
        return ws

    async def _receive(self, s: _Session, peer: str | None) -> None:
        max_buffer = int(self.cfg.max_buffer_s * self.engine.sample_rate)
        while True:
            try:
                msg = await s.ws.receive(timeout=self.cfg.idle_timeout_s)
            except TimeoutError:
                why = f"idle for {self.cfg.idle_timeout_s:g} s"
                await s.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=why.encode())
                return
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if msg.type == WSMsgType.ERROR:  # aiohttp has closed the connection
                err = s.ws.exception()
                if getattr(err, "code", None) == WSCloseCode.MESSAGE_TOO_BIG:
                    self._drop(peer, "oversize", f"a message over {self.cfg.max_message_bytes} B")
                else:
                    log.info("%s: connection error (%s)", peer, err)
                return
            if msg.type != WSMsgType.BINARY:
                self._drop(peer, "text_frame", "a text frame (Moshi's protocol is binary)")
                continue
            data: bytes = msg.data
            if not data:
                self._drop(peer, "empty", "an empty message")
                continue
            if data[0] != AUDIO:
                kind = "client_text" if data[0] == TEXT else "unknown_kind"
                self._drop(peer, kind, f"a message of kind {data[0]}")
                continue
            try:
                pcm = s.reader.append_bytes(data[1:])
            except ValueError as err:
                self._drop(peer, "bad_opus", f"undecodable Opus ({err}); closing")
                await s.ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"undecodable Opus")
                return
            if pcm.size:
                s.pending.append(np.asarray(pcm, np.float32))
                s.buffered += pcm.size
                self._wake.set()
            if s.buffered > max_buffer:
                self._drop(peer, "overrun", f"{s.buffered} samples ahead; closing")
                why = f"more than {self.cfg.max_buffer_s:g} s of audio ahead of the model"
                await s.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=why.encode())
                return

    def _drop(self, peer: str | None, kind: str, what: str) -> None:
        self.metrics.malformed.labels(kind).inc()
        log.warning("%s: dropped %s", peer, what)

    def _update_gauges(self) -> None:
        self.metrics.sessions.set(len(self.sessions))
        self.metrics.free.set(self.engine.slots - len(self.sessions))

    # ------------------------------------------------------------------ the engine loop

    async def warm_up(self) -> None:
        """Compile the step (before any session); /healthz turns ready."""
        await self._engine(self.engine.warm_up)
        self.ready = True

    async def _drive(self) -> None:
        """One step per frame on a clock, for every session that has started; a step late by
        up to MAX_DEBT frames is caught up at once, further debt is forgiven."""
        n = self.engine.frame_size
        start_at = n + self._jitter_samples
        tick: float | None = None
        while True:
            sessions = [s for s in self.sessions.values() if s.started or s.buffered >= start_at]
            if not sessions:
                tick = None
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.perf_counter()
            tick = now if tick is None else tick
            if now < tick:
                await asyncio.sleep(tick - now)
                continue
            await self._step(sessions, n)
            tick = max(tick + self._frame_s, time.perf_counter() - MAX_DEBT * self._frame_s)

    async def _step(self, sessions: list[_Session], n: int) -> None:
        loop = asyncio.get_running_loop()
        async with self._lock:  # no session leaves the engine until the step is done
            sessions = [s for s in sessions if self.sessions.get(s.slot) is s]
            user = {}
            for s in sessions:
                if not s.started:
                    reset = self.engine.reset
                    await loop.run_in_executor(None, reset, s.slot, s.key, s.sampling)
                    s.started = True
                if s.buffered >= n:
                    user[s.slot] = s.take(n)
                else:
                    self.metrics.underruns.inc()
            t0 = time.perf_counter()
            frame = await loop.run_in_executor(None, self.engine.step, user)
            self.metrics.latency.observe(time.perf_counter() - t0)
        ahead = self._jitter_samples
        self.metrics.behind.set(max((max(0, s.buffered - ahead) // n for s in sessions), default=0))
        await asyncio.gather(*(self._send(s, frame) for s in sessions))

    async def _send(self, s: _Session, frame: Frame) -> None:
        if s.ws.closed or self.sessions.get(s.slot) is not s:
            return
        try:
            opus = s.writer.append_pcm(np.clip(frame.audio[s.slot], -1.0, 1.0))
            if opus:
                await s.ws.send_bytes(bytes([AUDIO]) + opus)
            token = int(frame.text[s.slot])
            if frame.valid[s.slot] and token not in self.pad_ids:
                await s.ws.send_bytes(bytes([TEXT]) + self._piece(token).encode())
            s.sent_frames += 1
        except (ConnectionError, RuntimeError) as err:  # the client went away mid-send
            log.info("slot %d: send failed (%s)", s.slot, err)

    def _piece(self, token: int) -> str:
        if self.pieces is None or not 0 <= token < len(self.pieces):
            return f"<{token}>"
        return self.pieces[token].replace("\u2581", " ")


# Query parameters of Moshi's clients -> SessionSampling fields.
SAMPLING_PARAMS: dict[str, tuple[str, type]] = {
    "text_temperature": ("temp_text", float),
    "text_topk": ("top_k_text", int),
    "audio_temperature": ("temp", float),
    "audio_topk": ("top_k", int),
}


def _session_sampling(query: Mapping[str, str]) -> SessionSampling:
    """The session's sampling from the query (unset ones: the engine's)."""
    given = {}
    for param, (field, kind) in SAMPLING_PARAMS.items():
        if param in query:
            try:
                value = kind(query[param])
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise ValueError(f"{param}: {query[param]!r} is not {what}") from None
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{param}: must be a finite number >= 0, got {value}")
            given[field] = value
    return SessionSampling(**given)


def _session_key(seed: str | None) -> jax.Array | None:
    if seed is None:
        return None
    try:
        return jax.random.key(int(seed))
    except ValueError:
        raise ValueError(f"seed: {seed!r} is not an integer") from None


async def serve(server: Server, cfg: ServeConfig) -> web.AppRunner:
    """Start listening (returns once bound), then compile; the caller keeps the loop alive."""
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    await server.warm_up()
    return runner
