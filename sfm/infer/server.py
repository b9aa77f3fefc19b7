"""`sfm serve`: Moshi's WebSocket protocol over the engine, many conversations at once.

    GET /           the web page (static/: microphone in, the model's voice out, its text);
                    `/?token=...` passes the token on to /api/chat
    GET /api/chat   WebSocket; binary messages, the first byte their kind (Moshi's protocol):
                    server -> 0x00 when the session is ready; 0x01 + Ogg/Opus (24 kHz mono)
                    both ways; server -> 0x02 + UTF-8, the model's text pieces.
                    Query: `seed` (the session's sampling key; default a new one per session),
                    moshi's `text_temperature`, `text_topk`, `audio_temperature`, `audio_topk`
                    (the session's own; top-k at most the server's), `token` if it has one.
    GET /healthz    200 once the engine's step is compiled, 503 before (or after it failed)
    GET /metrics    Prometheus text: sessions, free slots, frame latency, frames behind real
                    time, underruns, step errors, malformed messages by kind

Each connection holds one engine slot; when all are busy the client is closed with code 1013
and the reason. One task drives the engine on a clock, one step per frame (80 ms for Mimi)
for all sessions. A session starts (its slot reset with its key) once a frame plus
`serve.jitter_buffer_s` of its audio has arrived, so what it hears before that cannot change
what it says and network jitter up to that much costs nothing; a started session whose audio
is late hears silence for that frame (an underrun). Engine calls run one at a time in a
worker thread, so the event loop keeps reading every client while the step computes, and
each session's replies go out through its own queue (see `sfm.infer.session`).

A malformed message (text frame, empty, unknown kind, client text) is logged on one line,
counted and dropped; after MAX_MALFORMED of them, or on undecodable Opus, an oversize
message (aiohttp closes with 1009), silence for `serve.idle_timeout_s` (counted once the
audio it sent has been heard), audio further ahead than `serve.max_buffer_s` or a full reply
queue, the client is closed with a reason. A request from a web page of another origin is
refused. A disconnect, clean or not, frees the slot.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
import sphn
from aiohttp import WSCloseCode, WSMsgType, web
from prometheus_client import generate_latest

from sfm.errors import ConfigError
from sfm.infer.config import LOOPBACK, ServeConfig
from sfm.infer.engine import Engine, Frame
from sfm.infer.session import Metrics, Session, close, session_key, session_sampling

log = logging.getLogger("sfm.serve")
HANDSHAKE, AUDIO, TEXT = 0, 1, 2
TOKEN_ENV = "SFM_SERVE_TOKEN"
STATIC = Path(__file__).parent / "static"  # the web page
MAX_DEBT = 4  # frames a late step may be behind the clock before the lag is forgiven
MAX_MALFORMED = 20  # malformed messages a client may send before it is closed
MAX_STEP_ERRORS = 10  # failed steps in a row before the server stops serving
T = TypeVar("T")


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
        self.ready = False
        self.sessions: dict[int, Session] = {}
        self.metrics = Metrics()
        self.metrics.sessions.set_function(lambda: len(self.sessions))
        self.metrics.free.set_function(lambda: int((~self.engine.busy).sum()))
        self._lock = asyncio.Lock()  # one engine call at a time
        self._wake = asyncio.Event()
        self._frame_s = engine.frame_size / engine.sample_rate
        self._jitter_samples = int(cfg.jitter_buffer_s * engine.sample_rate)
        self._errors = 0  # failed steps in a row
        self._closing: set[asyncio.Task] = set()  # closes under way (a reference each)

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
        await asyncio.gather(self._driver, return_exceptions=True)

    async def _in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn` in the worker thread; if this task is cancelled, the call still finishes
        before the cancellation goes on (the engine's state is donated: calls never overlap)."""
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            raise

    async def _engine(self, fn: Callable[..., T], *args: Any) -> T:
        """An engine call, after any other has finished."""
        async with self._lock:
            return await self._in_worker(fn, *args)

    def _refusal(self, request: web.Request) -> web.HTTPException | None:
        """Why `request` may not use the server: a missing or wrong token, or a web page of
        another origin (browsers send Origin; other clients need not)."""
        origin = request.headers.get("Origin")
        if origin and urlsplit(origin).netloc != request.host:
            return web.HTTPForbidden(text=f"origin {origin} is not this server's")
        if not self.token:
            return None
        header = request.headers.get("Authorization", "")
        given = request.query.get("token") or header.removeprefix("Bearer ").strip()
        if hmac.compare_digest(given.encode(), self.token.encode()):
            return None
        return web.HTTPUnauthorized(text="a token is required")

    async def _page(self, request: web.Request) -> web.FileResponse:
        """The web page (and its script)."""
        return web.FileResponse(
            STATIC / ("chat.js" if request.path == "/chat.js" else "index.html")
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        if self.ready:
            return web.Response(text="ok")
        return web.Response(status=503, text="not ready")

    async def _metrics(self, request: web.Request) -> web.Response:
        if refusal := self._refusal(request):
            raise refusal
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    # ------------------------------------------------------------------ a conversation

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if refusal := self._refusal(request):
            raise refusal
        ws = web.WebSocketResponse(max_msg_size=self.cfg.max_message_bytes)
        await ws.prepare(request)
        peer = request.remote
        try:
            key, sampling = session_key(request.query.get("seed")), session_sampling(request.query)
        except ValueError as err:
            await close(ws, WSCloseCode.POLICY_VIOLATION, str(err))
            return ws
        try:
            if not self.ready:
                raise RuntimeError("not ready (warming up)")
            slot = await self._engine(self.engine.join, key, sampling)
        except RuntimeError as err:  # not ready, or every slot busy
            await close(ws, WSCloseCode.TRY_AGAIN_LATER, str(err))
            return ws
        rate, frames = self.engine.sample_rate, int(self.cfg.max_buffer_s / self._frame_s)
        outbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=2 * frames + 8)  # audio + text
        reader, writer = sphn.OpusStreamReader(rate), sphn.OpusStreamWriter(rate)
        session = Session(slot, ws, key, sampling, outbox, reader, writer)
        self.sessions[slot] = session
        session.send(bytes([HANDSHAKE]))
        sender = asyncio.create_task(session.write())
        log.info("%s: session in slot %d", peer, slot)
        try:
            await self._receive(session, peer)
        finally:
            del self.sessions[slot]
            sender.cancel()
            await self._engine(self.engine.leave, slot)
            if not ws.closed:
                await ws.close()
            log.info("%s: slot %d free", peer, slot)
        return ws

    async def _receive(self, s: Session, peer: str | None) -> None:
        max_buffer = int(self.cfg.max_buffer_s * self.engine.sample_rate)
        heard = time.monotonic()  # the idle clock runs from the last audio heard
        while True:
            try:
                wait = heard + self.cfg.idle_timeout_s - time.monotonic()
                msg = await s.ws.receive(timeout=max(wait, 0.001))
            except TimeoutError:
                if s.buffered >= self.engine.frame_size:  # its audio is still being heard
                    heard = time.monotonic()
                    continue
                why = f"idle for {self.cfg.idle_timeout_s:g} s"
                return await close(s.ws, WSCloseCode.POLICY_VIOLATION, why)
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if msg.type == WSMsgType.ERROR:  # aiohttp has closed the connection
                err = s.ws.exception()
                if getattr(err, "code", None) == WSCloseCode.MESSAGE_TOO_BIG:
                    self._drop(s, peer, "oversize", f"over {self.cfg.max_message_bytes} B")
                else:
                    log.info("%s: connection error (%s)", peer, err)
                return
            data = msg.data if msg.type == WSMsgType.BINARY else None
            if not data or data[0] != AUDIO:
                kind = (
                    "text_frame" if data is None else
                    "empty" if not data else
                    "client_text" if data[0] == TEXT else "unknown_kind"
                )  # fmt: skip
                self._drop(s, peer, kind, "a message that is not user audio")
                if s.malformed >= MAX_MALFORMED:
                    why = f"{MAX_MALFORMED} malformed messages"
                    return await close(s.ws, WSCloseCode.POLICY_VIOLATION, why)
                continue
            try:
                if s.hear(data[1:]):
                    heard = time.monotonic()
                    self._wake.set()
            except ValueError as err:
                self._drop(s, peer, "bad_opus", f"undecodable Opus ({err}); closing")
                return await close(s.ws, WSCloseCode.UNSUPPORTED_DATA, "undecodable Opus")
            if s.buffered > max_buffer:
                why = f"more than {self.cfg.max_buffer_s:g} s of audio ahead of the model"
                return await close(s.ws, WSCloseCode.POLICY_VIOLATION, why)

    def _drop(self, s: Session, peer: str | None, kind: str, what: str) -> None:
        s.malformed += 1
        self.metrics.malformed.labels(kind).inc()
        log.warning("%s: dropped %s: %s", peer, kind, what)

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
            try:
                await self._step(sessions, n)
                self._errors = 0
            except Exception:  # a bug must not silently stop every conversation
                log.exception("engine step failed")
                self.metrics.step_errors.inc()
                self._errors += 1
                if self._errors >= MAX_STEP_ERRORS:
                    await self._stop_serving()
            tick = max(tick + self._frame_s, time.perf_counter() - MAX_DEBT * self._frame_s)

    async def _stop_serving(self) -> None:
        """After MAX_STEP_ERRORS failed steps in a row: unready, every client told why."""
        self.ready = False
        why = f"internal error: {MAX_STEP_ERRORS} engine steps failed"
        await asyncio.gather(
            *(close(s.ws, WSCloseCode.INTERNAL_ERROR, why) for s in list(self.sessions.values()))
        )

    async def _step(self, sessions: list[Session], n: int) -> None:
        async with self._lock:  # no session leaves the engine until the step is done
            sessions = [s for s in sessions if self.sessions.get(s.slot) is s]
            user = {}
            for s in sessions:
                if not s.started:
                    await self._in_worker(self.engine.reset, s.slot, s.key, s.sampling)
                    s.started = True
                if s.buffered >= n:
                    user[s.slot] = s.take(n)
                else:
                    self.metrics.underruns.inc()
            t0 = time.perf_counter()
            frame = await self._in_worker(self.engine.step, user)
            self.metrics.latency.observe(time.perf_counter() - t0)
        ahead = self._jitter_samples
        self.metrics.behind.set(max((max(0, s.buffered - ahead) // n for s in sessions), default=0))
        for s in sessions:
            self._reply(s, frame)

    def _reply(self, s: Session, frame: Frame) -> None:
        """Queue the model's frame for `s`; a client whose queue is full is closed."""
        if s.ws.closed or self.sessions.get(s.slot) is not s:
            return
        messages = [bytes([AUDIO]) + s.writer.append_pcm(np.clip(frame.audio[s.slot], -1, 1))]
        token = int(frame.text[s.slot])
        if frame.valid[s.slot] and token not in self.pad_ids:
            messages.append(bytes([TEXT]) + self._piece(token).encode())
        for message in messages:
            if len(message) > 1 and not s.send(message):
                log.warning("slot %d: the client stopped reading; closing", s.slot)
                why = "not reading the model's replies"
                task = asyncio.create_task(close(s.ws, WSCloseCode.POLICY_VIOLATION, why))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
                return

    def _piece(self, token: int) -> str:
        if self.pieces is None or not 0 <= token < len(self.pieces):
            return f"<{token}>"
        return self.pieces[token].replace("\u2581", " ")


async def serve(server: Server, cfg: ServeConfig) -> web.AppRunner:
    """Start listening (returns once bound), then compile; the caller keeps the loop alive."""
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    await server.warm_up()
    return runner
