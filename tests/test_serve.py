"""`sfm serve` and `sfm chat`: Moshi's protocol over the engine, checked against the engine run
by hand; busy slots, tokens, malformed messages, idle clients and disconnects; a short load
test (bench/serve.py runs the long one)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sphn
from flax import nnx

from sfm.codec.model import Mimi
from sfm.config import load_config, resolve_preset
from sfm.errors import ConfigError
from sfm.infer.client import PAGE, ChatError, chat, with_query
from sfm.infer.config import ServeConfig
from sfm.infer.engine import Engine
from sfm.infer.server import Server, serve
from sfm.lm.generate import SamplingConfig
from sfm.lm.model import LM
from sfm.testing.audio import gliding_tone
from sfm.testing.load import run_load

SLOTS, TOKEN, RATE = 4, "s3cret", 24000
SAMPLING = SamplingConfig()


def _speech(seconds: float, seed: int) -> np.ndarray:
    """A gliding tone with noise: audio that moves the codes."""
    return gliding_tone(int(seconds * RATE), np.random.default_rng(seed))


class Running:
    """A server on an event loop of its own thread, bound to a free loopback port."""

    def __init__(self, server: Server, cfg: ServeConfig) -> None:
        self.server, self.loop = server, asyncio.new_event_loop()
        self.runner = self.loop.run_until_complete(serve(server, cfg))
        self.port = self.runner.addresses[0][1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/api/chat", **query: str | int | None) -> str:
        scheme = "ws" if path == "/api/chat" else "http"
        return with_query(f"{scheme}://127.0.0.1:{self.port}{path}", **query)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module")
def models() -> tuple[Mimi, LM]:
    """The tiny codec (codebooks from one training pass, so audio moves the codes) and LM."""
    cfg = load_config(resolve_preset("tiny", "lm"))
    codec = Mimi(cfg.codec, rngs=nnx.Rngs(0))
    codec(jnp.asarray(np.stack([_speech(0.8, s) for s in range(4)])), jax.random.key(0))
    return codec, LM(cfg.lm, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def running(models: tuple[Mimi, LM]) -> Iterator[Running]:
    cfg = ServeConfig(port=0, slots=SLOTS, token=TOKEN, idle_timeout_s=4.0, max_buffer_s=5.0)
    engine = Engine(*models, SLOTS, SAMPLING)
    run = Running(Server(engine, cfg, pad_ids=(0, 3)), cfg)
    yield run
    run.close()


def _pages(seconds: float, seed: int) -> bytes:
    """Ogg/Opus pages of `seconds` of speech (whole 80 ms pages)."""
    writer, wav = sphn.OpusStreamWriter(RATE), _speech(seconds, seed)
    return b"".join(
        writer.append_pcm(wav[i : i + PAGE]) for i in range(0, len(wav) - PAGE + 1, PAGE)
    )


def _opus_round_trip(user_t: np.ndarray) -> np.ndarray:
    """What the server hears: the client's Opus pages decoded."""
    writer, reader = sphn.OpusStreamWriter(RATE), sphn.OpusStreamReader(RATE)
    frames = -(-len(user_t) // PAGE)
    padded = np.zeros(frames * PAGE, np.float32)
    padded[: len(user_t)] = user_t
    data = b"".join(writer.append_pcm(padded[i * PAGE : (i + 1) * PAGE]) for i in range(frames))
    return np.asarray(reader.append_bytes(data), np.float32)


def _pieces_by_hand(
    models: tuple[Mimi, LM], heard: np.ndarray, seed: int, sampling: SamplingConfig = SAMPLING
) -> list[str]:
    """The text an engine like the server's says to `heard`, then to silence (what a session
    hears once its client has sent everything)."""
    engine = Engine(*models, SLOTS, sampling)
    slot = engine.join(jax.random.key(seed))
    n, pieces = engine.frame_size, []
    heard = np.concatenate([heard, np.zeros(100 * n, np.float32)])
    for t in range(len(heard) // n):
        out = engine.step({slot: heard[t * n : (t + 1) * n]})
        if out.valid[slot] and int(out.text[slot]) not in (0, 3):
            pieces.append(f"<{int(out.text[slot])}>")
    return pieces


def _metric(run: Running, name: str) -> float:
    return _metric_of(run, name, TOKEN)


def _eventually(check: Callable[[], bool], seconds: float = 20.0) -> bool:
    """Whether `check()` holds within `seconds` (the server frees a slot after the client
    has seen its connection close)."""
    deadline = time.perf_counter() + seconds
    while not check():
        if time.perf_counter() > deadline:
            return False
        time.sleep(0.1)
    return True


def _all_free(run: Running, token: str | None = TOKEN, slots: int = SLOTS) -> bool:
    return _metric_of(run, "sfm_free_slots", token) == slots


def _metric_of(run: Running, name: str, token: str | None = None) -> float:
    text = asyncio.run(_get(run.url("/metrics", token=token)))[1]
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


async def _get(url: str, **kw: object) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url, **kw) as resp:  # type: ignore[arg-type]
        return resp.status, await resp.text()


def test_a_conversation_equals_the_engine_by_hand_and_a_second_one_is_fresh(
    running: Running, models: tuple[Mimi, LM]
) -> None:
    user = _speech(1.6, 0)
    talks = [asyncio.run(chat(running.url(seed=7, token=TOKEN), user, fast=True)) for _ in "ab"]
    want = _pieces_by_hand(models, _opus_round_trip(user), seed=7)
    for talk in talks:
        got = [piece for _, _, piece in talk.text]
        assert len(got) > len(user) // 480 - 8 and got == want[: len(got)]
        np.testing.assert_array_equal(talk.stereo_tc[: len(user), 1], user)
        assert np.abs(talk.stereo_tc[:, 0]).max() > 0
    np.testing.assert_array_equal(talks[0].stereo_tc, talks[1].stereo_tc)  # fresh, not resumed
    assert [t[2] for t in talks[0].text] == [t[2] for t in talks[1].text]
    assert _eventually(lambda: _all_free(running))


def test_busy_slots_get_a_close_reason_and_a_freed_slot_serves_again(running: Running) -> None:
    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            held = [await http.ws_connect(running.url(token=TOKEN)) for _ in range(SLOTS)]
            for ws in held:
                assert (await ws.receive()).data == b"\x00"
            extra = await http.ws_connect(running.url(token=TOKEN))
            msg = await extra.receive()
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1013
            assert msg.extra == f"all {SLOTS} slots are busy"
            await held[0].close()
            await asyncio.to_thread(_eventually, lambda: _metric(running, "sfm_free_slots") == 1)
            again = await http.ws_connect(running.url(token=TOKEN))
            assert (await again.receive()).data == b"\x00"
            for ws in [again, *held[1:]]:
                await ws.close()

    asyncio.run(scenario())
    assert _eventually(lambda: _all_free(running))


def test_a_token_is_required_and_compared(running: Running) -> None:
    assert asyncio.run(_get(running.url("/metrics")))[0] == 401
    assert asyncio.run(_get(running.url("/metrics", token="wrong")))[0] == 401
    header = {"Authorization": f"Bearer {TOKEN}"}
    assert asyncio.run(_get(running.url("/metrics"), headers=header))[0] == 200
    assert asyncio.run(_get(running.url("/healthz"))) == (200, "ok")
    with pytest.raises(ChatError, match="refused the connection: 401"):
        asyncio.run(chat(running.url(), _speech(0.2, 1)))
    with pytest.raises(ConfigError, match="serve.host: 0.0.0.0 is not loopback"):
        Server(Engine(*_tiny_pair(), 1), ServeConfig(host="0.0.0.0"))


def _tiny_pair() -> tuple[Mimi, LM]:
    cfg = load_config(resolve_preset("tiny", "lm"))
    return Mimi(cfg.codec, rngs=nnx.Rngs(0)), LM(cfg.lm, rngs=nnx.Rngs(1))


def test_malformed_messages_are_dropped_and_bad_opus_closes_only_its_session(
    running: Running, models: tuple[Mimi, LM]
) -> None:
    before = _metric(running, "sfm_malformed_messages_total")

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(running.url(token=TOKEN))
            assert (await ws.receive()).data == b"\x00"
            await ws.send_str("hello")
            for data in (b"", b"\x07abc", b"\x02text from the client", b"\x00"):
                await ws.send_bytes(data)
            await ws.send_bytes(b"\x01" + _pages(0.16, 2))  # a frame + the jitter buffer
            msg = await ws.receive(timeout=10)  # still served: the model's audio comes back
            assert msg.type == aiohttp.WSMsgType.BINARY and msg.data[0] in (1, 2)
            bystander = await http.ws_connect(running.url(token=TOKEN))
            assert (await bystander.receive()).data == b"\x00"
            await ws.send_bytes(b"\x01" + b"garbage, not an Ogg page " * 8)
            while (msg := await ws.receive(timeout=10)).type == aiohttp.WSMsgType.BINARY:
                pass
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.extra == "undecodable Opus"
            big = await http.ws_connect(running.url(token=TOKEN))
            assert (await big.receive()).data == b"\x00"
            await big.send_bytes(b"\x01" + bytes(1 << 17))
            while (msg := await big.receive(timeout=10)).type == aiohttp.WSMsgType.BINARY:
                pass
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1009
            await bystander.send_bytes(b"\x01" + _pages(0.16, 3))
            msg = await bystander.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.BINARY
            await bystander.close()

    asyncio.run(scenario())
    assert _metric(running, "sfm_malformed_messages_total") - before == 7
    assert _eventually(lambda: _all_free(running))


def test_an_idle_client_is_closed_with_a_reason(running: Running) -> None:
    async def scenario() -> aiohttp.WSMessage:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(running.url(token=TOKEN))
            assert (await ws.receive()).data == b"\x00"
            return await ws.receive(timeout=20)

    msg = asyncio.run(scenario())
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.extra == "idle for 4 s"


def test_chat_cli_writes_the_conversation(running: Running, tmp_path: Path) -> None:
    import json

    import soundfile as sf

    from sfm.cli import main

    user = _speech(1.0, 4)
    sf.write(tmp_path / "user.wav", user, RATE, subtype="FLOAT")
    argv = ["chat", "--url", running.url(), "--token", TOKEN, "--seed", "3", "--fast"]
    assert main([*argv, "--wav", str(tmp_path / "user.wav"), "--out", str(tmp_path / "o.wav")]) == 0
    stereo, rate = sf.read(tmp_path / "o.wav", dtype="float32")
    assert rate == RATE and stereo.shape[1] == 2 and stereo.shape[0] >= len(user)
    text = json.loads((tmp_path / "o.json").read_text())
    assert text["channels"] == ["model", "user"]
    wrong = ["chat", "--url", running.url(token="wrong"), "--wav", str(tmp_path / "user.wav")]
    assert main([*wrong, "--out", str(tmp_path / "x.wav")]) == 2


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_load_many_users_with_abrupt_disconnects_and_malformed_messages(
    models: tuple[Mimi, LM],
) -> None:
    """8 users for 15 s in real time, reconnecting, a third of turns cut off and a quarter
    sending malformed messages: the server stays up, no slot leaks, memory stays flat."""
    cfg = ServeConfig(port=0, slots=8, idle_timeout_s=10.0)
    run = Running(Server(Engine(*models, 8, SAMPLING), cfg), cfg)
    try:
        asyncio.run(run_load(run.url(), 8, 3.0, seed=1, turn_s=(0.5, 1.0)))  # warm
        rss, malformed = _rss_mib(), _metric_of(run, "sfm_malformed_messages_total")
        report = asyncio.run(run_load(run.url(), 8, 15.0, seed=2, turn_s=(1.0, 3.0)))
        assert _eventually(lambda: _all_free(run, None, 8))
        grown = _rss_mib() - rss
        lat = report.percentiles()
        print(
            f"turns {report.turns}, aborted {report.aborted}, refused {report.refused}, "
            f"lag ms {lat}, rss +{grown:.1f} MiB, server step {run.server.engine.latency_ms()}"
        )
        assert not report.errors, report.errors[:3]
        assert report.turns >= 30 and report.aborted >= 8 and report.malformed_sent >= 20
        assert _eventually(lambda: _all_free(run, None, 8))
        assert _metric_of(run, "sfm_sessions_active") == 0
        dropped = _metric_of(run, "sfm_malformed_messages_total") - malformed
        assert dropped == report.malformed_sent
        assert asyncio.run(_get(run.url("/healthz"))) == (200, "ok")
        assert grown < 64, f"memory grew by {grown:.1f} MiB across {report.turns} sessions"
    finally:
        run.close()


def test_the_web_page_talks_in_headless_chromium(running: Running, tmp_path: Path) -> None:
    """Debian's chromium with a WAV file as its microphone: the page connects, streams for a
    few seconds, plays back the model's audio in real time and shows its text; disconnecting
    frees the slot."""
    import soundfile as sf
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    sf.write(tmp_path / "mic.wav", _speech(8.0, 5), RATE, subtype="PCM_16")
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={tmp_path / 'mic.wav'}",
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        browser.get(f"http://127.0.0.1:{running.port}/?token={TOKEN}&seed=1")
        browser.find_element(By.ID, "connect").click()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 30:
            stats = browser.execute_script("return window.sfm")
            if stats["received"] >= 3.0:
                break
            time.sleep(0.5)
        seconds = time.perf_counter() - t0
        assert stats["status"] == "connected: talk", stats
        assert stats["received"] >= 3.0 and stats["received"] <= seconds + 0.5, (stats, seconds)
        assert stats["pieces"] > 0 and browser.find_element(By.ID, "transcript").text
        assert browser.find_element(By.ID, "lag").text.endswith(" ms")
        assert _metric(running, "sfm_sessions_active") == 1
        browser.find_element(By.ID, "connect").click()
        time.sleep(1.0)
        assert browser.execute_script("return window.sfm.status") == "disconnected"
    finally:
        browser.quit()
    assert _eventually(lambda: _all_free(running))


def test_sampling_settings_from_the_query(running: Running, models: tuple[Mimi, LM]) -> None:
    """Moshi's query parameters: temperature 0 gives the greedy engine's words; a bad value is
    refused with a reason naming the parameter."""
    user = _speech(1.2, 6)
    url = running.url(seed=2, token=TOKEN, text_temperature=0, audio_temperature=0)
    talk = asyncio.run(chat(url, user, fast=True))
    greedy = SamplingConfig(temp=0.0, temp_text=0.0)
    want = _pieces_by_hand(models, _opus_round_trip(user), seed=2, sampling=greedy)
    got = [piece for _, _, piece in talk.text]
    assert len(got) > len(user) // 480 - 8 and got == want[: len(got)]
    with pytest.raises(ChatError, match="audio_topk: 'many' is not an integer"):
        asyncio.run(chat(running.url(token=TOKEN, audio_topk="many"), user))
    with pytest.raises(ChatError, match="text_temperature: must be a finite number >= 0"):
        asyncio.run(chat(running.url(token=TOKEN, text_temperature=-1), user))


def test_a_long_fast_chat_and_a_client_that_stops_reading(running: Running) -> None:
    """12 s sent as fast as the server takes it (more than one Opus decode may hold) comes
    back whole while a neighbour that never reads its replies is closed without holding
    anyone up."""

    async def scenario() -> tuple[object, aiohttp.WSMessage]:
        async with aiohttp.ClientSession() as http:
            mute = await http.ws_connect(running.url(token=TOKEN))
            assert (await mute.receive()).data == b"\x00"
            pages = _pages(8.0, 9)

            async def talk_without_listening() -> None:
                for i in range(0, len(pages), 400):
                    await mute.send_bytes(b"\x01" + pages[i : i + 400])
                    await asyncio.sleep(0.05)

            talker = asyncio.create_task(talk_without_listening())
            talk = await chat(running.url(token=TOKEN, seed=4), _speech(12.0, 8), fast=True)
            await talker
            while (msg := await mute.receive(timeout=30)).type == aiohttp.WSMsgType.BINARY:
                pass
            return talk, msg

    talk, msg = asyncio.run(scenario())
    assert talk.stereo_tc.shape[0] >= 12 * RATE and np.abs(talk.stereo_tc[:, 0]).max() > 0
    assert msg.type == aiohttp.WSMsgType.CLOSE, msg
    assert msg.extra in ("not reading the model's replies", "idle for 4 s"), msg
    assert _eventually(lambda: _all_free(running))


def test_a_page_of_another_origin_is_refused(running: Running) -> None:
    async def handshake(origin: str) -> int:
        async with aiohttp.ClientSession() as http:
            try:
                ws = await http.ws_connect(running.url(token=TOKEN), headers={"Origin": origin})
            except aiohttp.WSServerHandshakeError as err:
                return err.status
            await ws.close()
            return 101

    assert asyncio.run(handshake("http://evil.example")) == 403
    assert asyncio.run(handshake(f"http://127.0.0.1:{running.port}")) == 101


def test_sfm_serve_command_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The `sfm serve` command (random tiny weights) answers `sfm chat`, then stops cleanly
    on SIGTERM; off loopback without a token it refuses to start, on one line."""
    import signal
    import socket
    import subprocess
    import sys

    import soundfile as sf

    from sfm.cli import main

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "sfm", "serve", "--config", "tiny", "--slots", "1"]
    server = subprocess.Popen(
        [*cmd, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert _eventually(lambda: _healthy(port), 300), "the server did not become ready"
        sf.write(tmp_path / "user.wav", _speech(1.0, 7), RATE, subtype="FLOAT")
        url = f"ws://127.0.0.1:{port}/api/chat"
        argv = ["chat", "--url", url, "--wav", str(tmp_path / "user.wav"), "--fast"]
        assert main([*argv, "--out", str(tmp_path / "out.wav")]) == 0
        assert sf.info(tmp_path / "out.wav").duration >= 1.0
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=60)
    assert server.returncode == 0 and "stopped" in out, out[-2000:]
    refused = subprocess.run(
        [*cmd, "--host", "0.0.0.0"], capture_output=True, text=True, timeout=300
    )
    assert refused.returncode == 2
    assert "sfm: error: serve.host: 0.0.0.0 is not loopback" in refused.stderr


def _healthy(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return resp.read() == b"ok"
    except OSError:
        return False
