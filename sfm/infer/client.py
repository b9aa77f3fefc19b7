"""`sfm chat`: talk to a Moshi-protocol server (sfm's or moshi's) with a recorded user turn.

    talk = asyncio.run(chat("ws://127.0.0.1:8998/api/chat", user_t, fast=True))
    talk.write("out.wav")   # left: the model, right: the user; out.json: its text with times

The user's audio goes out as Ogg/Opus in 80 ms pages, one message each in real time (as a
person talks) or, with `fast`, about 4 KiB of pages per message as fast as the server takes
them (at most 4 s ahead of its replies); after the turn the client goes on sending silence,
as an open microphone does, until the model's audio is as long as the user's (a server
closes a client that falls silent). Text times are the model audio received before each
piece.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import numpy as np
import sphn

from sfm.errors import SfmError
from sfm.infer.converse import Conversation

AUDIO, TEXT, HANDSHAKE = 1, 2, 0
PAGE = 1920  # samples per Opus page sent (80 ms at 24 kHz)
FAST_MESSAGE_BYTES = 4 << 10  # with `fast`, pages are sent in messages of about this size
FAST_AHEAD_S = 4.0  # with `fast`, how far the user's audio may run ahead of the model's


class ChatError(SfmError):
    """The server refused or dropped the conversation; the message names the URL and why."""


def with_query(url: str, **params: str | int | None) -> str:
    """`url` with the given query parameters added (None ones left out)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query) + [(k, str(v)) for k, v in params.items() if v is not None]
    return urlunsplit(parts._replace(query=urlencode(query)))


@contextlib.asynccontextmanager
async def _connect(
    http: aiohttp.ClientSession, url: str
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    try:
        ws = await http.ws_connect(url)
    except aiohttp.WSServerHandshakeError as err:
        why = f"{err.status} {err.message}"
        raise ChatError(f"{url}: the server refused the connection: {why}") from None
    async with ws:
        yield ws


async def _handshake(ws: aiohttp.ClientWebSocketResponse, url: str, timeout_s: float) -> None:
    msg = await ws.receive(timeout=timeout_s)
    if msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == bytes([HANDSHAKE]):
        return
    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
        raise ChatError(f"{url}: the server closed the connection: {msg.extra or ws.close_code}")
    raise ChatError(f"{url}: expected the handshake (0x00), got {msg.type.name}")


async def chat(
    url: str,
    user_t: np.ndarray,
    sample_rate: int = 24000,
    fast: bool = False,
    timeout_s: float = 60.0,
) -> Conversation:
    """Send the mono float32 `user_t` to the server at `url`; the conversation that came back."""
    frames = -(-len(user_t) // PAGE)
    user = np.zeros(frames * PAGE, np.float32)
    user[: len(user_t)] = user_t
    model: list[np.ndarray] = []
    text: list[tuple[float, int, str]] = []
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as http, _connect(http, url) as ws:
        await _handshake(ws, url, timeout_s)
        writer, reader = sphn.OpusStreamWriter(sample_rate), sphn.OpusStreamReader(sample_rate)

        received = 0  # samples of the model's audio so far

        async def send() -> None:
            start, batch, silence = time.perf_counter(), b"", np.zeros(PAGE, np.float32)
            for i in itertools.count():  # the turn, then silence until the replies cover it
                page = user[i * PAGE : (i + 1) * PAGE] if i < frames else silence
                batch += writer.append_pcm(page)
                if fast and len(batch) < FAST_MESSAGE_BYTES and i + 1 < frames:
                    continue  # fast: pages go out together, so the server has them at once
                while fast and (i + 1) * PAGE - received > FAST_AHEAD_S * sample_rate:
                    await asyncio.sleep(0.01)  # within the server's buffer (serve.max_buffer_s)
                if batch:
                    await ws.send_bytes(bytes([AUDIO]) + batch)
                    batch = b""
                if not fast:
                    await asyncio.sleep(
                        max(0.0, start + (i + 1) * PAGE / sample_rate - time.perf_counter())
                    )

        async def receive() -> None:
            nonlocal received
            while received < len(user):
                msg = await ws.receive()
                if msg.type != aiohttp.WSMsgType.BINARY:
                    why = msg.extra or ws.close_code
                    raise ChatError(f"{url}: the server closed the conversation: {why}")
                if msg.data[:1] == bytes([AUDIO]):
                    pcm = reader.append_bytes(msg.data[1:])
                    model.append(np.asarray(pcm, np.float32))
                    received += pcm.size
                elif msg.data[:1] == bytes([TEXT]):
                    text.append((received / sample_rate, -1, msg.data[1:].decode(errors="replace")))

        sender = asyncio.create_task(send())
        try:
            await asyncio.wait_for(receive(), timeout_s)
        except TimeoutError:
            raise ChatError(f"{url}: no full reply within {timeout_s:g} s") from None
        finally:
            sender.cancel()
    got = np.concatenate(model)[: len(user)] if model else np.zeros(0, np.float32)
    reply = np.zeros_like(user)
    reply[: got.size] = got
    stereo = np.stack([reply, user], axis=1)
    return Conversation(stereo, sample_rate, text, time.perf_counter() - t0, frames)
