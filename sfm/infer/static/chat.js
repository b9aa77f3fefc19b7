// sfm's web client for Moshi's protocol: the microphone as Ogg/Opus pages (kind 0x01), the
// model's Ogg/Opus audio played back, its text pieces (kind 0x02) shown. Opus coding uses the
// browser's WebCodecs; the Ogg framing (RFC 3533, RFC 7845) is written out below. No
// libraries: nothing is fetched from anywhere but this server.
"use strict";

const RATE = 24000;
const state = { received: 0, pieces: 0, lagMs: null, status: "disconnected" };
window.sfm = state; // read by tests and handy in the console

// ---- Ogg pages ----------------------------------------------------------------------------

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let j = 0; j < 8; j++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    table[i] = r >>> 0;
  }
  return table;
})();

function oggCrc(bytes) {
  let crc = 0;
  for (const b of bytes) crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ b) & 0xff]) >>> 0;
  return crc;
}

class OggWriter {
  constructor() { this.serial = (Math.random() * 2 ** 32) >>> 0; this.sequence = 0; }

  page(packet, granule, flags = 0) {
    const lacing = [];
    let n = packet.length;
    while (n >= 255) { lacing.push(255); n -= 255; }
    lacing.push(n);
    const out = new Uint8Array(27 + lacing.length + packet.length);
    const view = new DataView(out.buffer);
    out.set([0x4f, 0x67, 0x67, 0x53, 0, flags]); // "OggS", version 0
    view.setBigInt64(6, BigInt(granule), true);
    view.setUint32(14, this.serial, true);
    view.setUint32(18, this.sequence++, true);
    out[26] = lacing.length;
    out.set(lacing, 27);
    out.set(packet, 27 + lacing.length);
    view.setUint32(22, oggCrc(out), true);
    return out;
  }

  headers() {
    const head = new Uint8Array(19);
    head.set(new TextEncoder().encode("OpusHead"));
    const v = new DataView(head.buffer);
    head[8] = 1; head[9] = 1; // version, one channel
    v.setUint16(10, 0, true); // pre-skip
    v.setUint32(12, RATE, true); // input sample rate
    const vendor = new TextEncoder().encode("sfm");
    const tags = new Uint8Array(8 + 4 + vendor.length + 4);
    tags.set(new TextEncoder().encode("OpusTags"));
    new DataView(tags.buffer).setUint32(8, vendor.length, true);
    tags.set(vendor, 12);
    return [this.page(head, 0, 0x02), this.page(tags, 0)];
  }
}

class OggReader {
  constructor(onPacket) { this.buffer = new Uint8Array(0); this.partial = []; this.onPacket = onPacket; }

  push(bytes) {
    const joined = new Uint8Array(this.buffer.length + bytes.length);
    joined.set(this.buffer); joined.set(bytes, this.buffer.length);
    this.buffer = joined;
    for (;;) {
      const b = this.buffer;
      if (b.length < 27) return;
      if (b[0] !== 0x4f || b[1] !== 0x67 || b[2] !== 0x67 || b[3] !== 0x53) throw new Error("not an Ogg page");
      const segments = b[26];
      if (b.length < 27 + segments) return;
      const lacing = b.subarray(27, 27 + segments);
      const size = lacing.reduce((a, x) => a + x, 0);
      const end = 27 + segments + size;
      if (b.length < end) return;
      let offset = 27 + segments;
      for (const len of lacing) {
        this.partial.push(b.subarray(offset, offset + len));
        offset += len;
        if (len < 255) this.emit();
      }
      this.buffer = b.slice(end);
    }
  }

  emit() {
    const size = this.partial.reduce((a, x) => a + x.length, 0);
    const packet = new Uint8Array(size);
    let at = 0;
    for (const part of this.partial) { packet.set(part, at); at += part.length; }
    this.partial = [];
    const magic = new TextDecoder().decode(packet.subarray(0, 8));
    if (magic !== "OpusHead" && magic !== "OpusTags") this.onPacket(packet);
  }
}

// ---- the conversation ---------------------------------------------------------------------

let session = null;
const $ = (id) => document.getElementById(id);

function show(status) {
  state.status = status;
  $("status").textContent = status;
  $("connect").textContent = session ? "Disconnect" : "Connect";
}

const TAP = `class Tap extends AudioWorkletProcessor {
  process(inputs) { const ch = inputs[0][0]; if (ch) this.port.postMessage(ch.slice(0)); return true; }
}
registerProcessor("tap", Tap);`;

async function connect() {
  if (typeof AudioEncoder === "undefined" || typeof AudioDecoder === "undefined") {
    show("this browser has no WebCodecs audio (use a recent Chromium, Edge or Firefox)");
    return;
  }
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/api/chat${location.search}`);
  ws.binaryType = "arraybuffer";
  const ctx = new AudioContext({ sampleRate: RATE });
  session = { ws, ctx, tracks: [], nextPlay: 0, sendStart: null, sent: 0 };
  state.received = 0; state.pieces = 0; $("transcript").textContent = "";
  show("connecting");

  const decoder = new AudioDecoder({
    output: (data) => play(data),
    error: (e) => show(`decoder error: ${e.message}`),
  });
  decoder.configure({ codec: "opus", sampleRate: RATE, numberOfChannels: 1 });
  let timestamp = 0;
  const reader = new OggReader((packet) => {
    decoder.decode(new EncodedAudioChunk({ type: "key", timestamp, data: packet }));
    timestamp += 20000;
  });

  ws.onmessage = async (event) => {
    const bytes = new Uint8Array(event.data);
    if (bytes[0] === 0) {
      try {
        await startMicrophone();
      } catch (e) {
        stop();
        show(`microphone: ${e.message}`);
      }
    }
    else if (bytes[0] === 1) reader.push(bytes.subarray(1));
    else if (bytes[0] === 2) {
      $("transcript").textContent += new TextDecoder().decode(bytes.subarray(1));
      state.pieces += 1;
    }
  };
  ws.onclose = (event) => {
    if (!session || session.ws !== ws) return; // we hung up ourselves
    stop();
    show(`closed${event.reason ? ": " + event.reason : ""}`);
  };
}

async function startMicrophone() {
  const s = session;
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false },
  });
  s.tracks = stream.getTracks();
  if (session !== s) { stop(s); return; } // hung up while the browser asked
  const ogg = new OggWriter();
  for (const page of ogg.headers()) s.ws.send(withKind(1, page));
  let granule = 0;
  const encoder = new AudioEncoder({
    output: (chunk) => {
      const packet = new Uint8Array(chunk.byteLength);
      chunk.copyTo(packet);
      granule += Math.round((chunk.duration ?? 20000) * 48 / 1000);
      if (s.ws.readyState === WebSocket.OPEN) s.ws.send(withKind(1, ogg.page(packet, granule)));
    },
    error: (e) => show(`encoder error: ${e.message}`),
  });
  encoder.configure({ codec: "opus", sampleRate: RATE, numberOfChannels: 1, bitrate: 32000 });
  s.encoder = encoder;
  await s.ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([TAP], { type: "text/javascript" })));
  const tap = new AudioWorkletNode(s.ctx, "tap");
  tap.port.onmessage = (event) => {
    const block = event.data;
    if (s.sendStart === null) s.sendStart = performance.now();
    encoder.encode(new AudioData({
      format: "f32-planar", sampleRate: RATE, numberOfChannels: 1,
      numberOfFrames: block.length, timestamp: Math.round(s.sent * 1e6 / RATE), data: block,
    }));
    s.sent += block.length;
  };
  const mute = s.ctx.createGain();
  mute.gain.value = 0;
  s.ctx.createMediaStreamSource(stream).connect(tap).connect(mute).connect(s.ctx.destination);
  show("connected: talk");
}

function play(data) {
  const s = session;
  if (!s) { data.close(); return; }
  const pcm = new Float32Array(data.numberOfFrames);
  const rate = data.sampleRate; // the decoder's choice (48 kHz in Chromium)
  data.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
  data.close();
  const buffer = s.ctx.createBuffer(1, pcm.length, rate);
  buffer.copyToChannel(pcm, 0);
  const source = s.ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(s.ctx.destination);
  const at = Math.max(s.nextPlay, s.ctx.currentTime + 0.03);
  source.start(at);
  s.nextPlay = at + pcm.length / rate;
  state.received += pcm.length / rate; // seconds of the model's voice
  if (s.sendStart !== null) {
    state.lagMs = performance.now() - s.sendStart - 1000 * state.received;
    $("lag").textContent = `${state.lagMs.toFixed(0)} ms`;
  }
  $("received").textContent = `${state.received.toFixed(1)} s`;
}

function withKind(kind, bytes) {
  const out = new Uint8Array(bytes.length + 1);
  out[0] = kind; out.set(bytes, 1);
  return out;
}

function stop(s = session) {
  if (!s) return;
  if (session === s) session = null;
  if (s.stopped) { for (const t of s.tracks) t.stop(); return; }
  s.stopped = true;
  for (const t of s.tracks) t.stop();
  if (s.encoder && s.encoder.state !== "closed") s.encoder.close();
  if (s.ws.readyState <= WebSocket.OPEN) s.ws.close();
  s.ctx.close();
}

$("connect").onclick = () => {
  if (session) { stop(); show("disconnected"); } else connect().catch((e) => show(`error: ${e.message}`));
};
