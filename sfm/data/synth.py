"""Speech synthesis with word timings: espeak-ng and flite through their C libraries (ctypes).

Both engines report where each word starts while they synthesize, so timings are exact
rather than recovered by an aligner; word ends are tightened to the last voiced frame.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sfm.data.audio import resample
from sfm.errors import SfmError

ESPEAK_ACCENTS = (
    "en",
    "en-us",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-us-nyc",
)
FLITE_VOICES = ("slt", "rms", "awb", "kal16")  # kal (8 kHz) and awb_time (clock only) left out
DEFAULT_RATE = 175  # words per minute (espeak-ng's default)
DEFAULT_PITCH = 50  # espeak-ng's 0-100 scale
FRAME_S = 0.01
SILENCE_DB = -45.0  # frames this far below the loudest frame count as silence
_WORD_RE = re.compile(r"\S+")
_EDGE_PUNCT = "\"'.,;:!?()[]{}-"


class SynthError(SfmError, ValueError):
    """A missing engine, unknown voice or failed synthesis; the message is one line."""


@dataclass(frozen=True)
class Voice:
    """An engine voice: name (accent or flite voice), variant, rate (wpm) and pitch (0-100)."""

    engine: str
    name: str
    variant: str = ""
    rate: int = DEFAULT_RATE
    pitch: int = DEFAULT_PITCH


@dataclass
class WordTiming:
    """A spoken word and its span in seconds."""

    word: str
    start: float
    end: float


@dataclass
class Utterance:
    """Mono float32 audio [T] with the timings of its words."""

    audio: np.ndarray
    words: list[WordTiming]
    text: str
    voice: Voice


# ---------------------------------------------------------------- shared helpers


def _clean(token: str) -> str:
    """A text token without surrounding punctuation."""
    return token.strip(_EDGE_PUNCT)


def frame_db(audio: np.ndarray, rate: int) -> np.ndarray:
    """Per-frame RMS level in dB relative to the loudest frame."""
    hop = max(1, int(FRAME_S * rate))
    n = max(1, len(audio) // hop)
    frames = np.resize(audio[: n * hop], (n, hop)).astype(np.float64)
    rms = np.sqrt(np.mean(frames**2, axis=1)) + 1e-9
    return 20 * np.log10(rms / rms.max())


def _tighten(words: list[WordTiming], audio: np.ndarray, rate: int) -> list[WordTiming]:
    """Move each word's start past leading and its end before trailing silent frames."""
    loud = frame_db(audio, rate) > SILENCE_DB
    out = []
    for w in words:
        a, b = int(w.start / FRAME_S), int(np.ceil(w.end / FRAME_S))
        idx = np.flatnonzero(loud[a:b])
        if idx.size:
            start = max(w.start, (a + idx[0]) * FRAME_S)
            end = min(w.end, (a + idx[-1] + 1) * FRAME_S, len(audio) / rate)
            out.append(WordTiming(w.word, float(start), float(end)))
    return out


def _finish(words: list[WordTiming], audio: np.ndarray, rate: int, out_rate: int) -> np.ndarray:
    """Tighten the timings in place and resample the audio to `out_rate`."""
    words[:] = _tighten(words, audio, rate)
    return resample(audio.astype(np.float32), rate, out_rate)


def _load(name: str) -> ctypes.CDLL:
    """Load a shared library by its short name, or fail with an install hint."""
    path = ctypes.util.find_library(name)
    if path is None:
        raise SynthError(f"lib{name}: not installed; run `bash launch/setup.sh` to install it")
    return ctypes.CDLL(path)


# ---------------------------------------------------------------- espeak-ng

_ESPEAK_SYNCHRONOUS = 2
_ESPEAK_DONT_EXIT = 0x8000
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_POS_CHARACTER = 1
_ESPEAK_RATE, _ESPEAK_PITCH = 1, 3
_EVENT_LIST_END, _EVENT_WORD = 0, 1


class _EspeakEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_void_p),
    ]


_ESPEAK_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent)
)


class _Espeak:
    """The process-wide espeak-ng library in synchronous mode, collecting samples and events."""

    def __init__(self) -> None:
        self.lib = _load("espeak-ng")
        self.lib.espeak_Info.restype = ctypes.c_char_p
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.rate = self.lib.espeak_Initialize(_ESPEAK_SYNCHRONOUS, 0, None, _ESPEAK_DONT_EXIT)
        if self.rate <= 0:
            raise SynthError("libespeak-ng: initialisation failed (espeak-ng-data missing?)")
        self.chunks: list[np.ndarray] = []
        self.events: list[tuple[int, int]] = []  # (text position, audio position in ms)
        self.callback = _ESPEAK_CALLBACK(self._collect)  # kept alive for the library
        self.lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, wav: ctypes.Array, n: int, events: ctypes.Array) -> int:
        """Synthesis callback: keep the samples and the word events."""
        if n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_END:
            if events[i].type == _EVENT_WORD:
                self.events.append((events[i].text_position, events[i].audio_position))
            i += 1
        return 0

    def data_dir(self) -> Path:
        """The espeak-ng-data directory the library uses."""
        path = ctypes.c_char_p()
        self.lib.espeak_Info(ctypes.byref(path))
        return Path((path.value or b"").decode())

    def synth(self, text: str, voice: Voice) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Samples (float32) and (text position, ms) word events for `text`."""
        name = voice.name + (f"+{voice.variant}" if voice.variant else "")
        if self.lib.espeak_SetVoiceByName(name.encode()) != 0:
            raise SynthError(f"espeak-ng: unknown voice {name!r}")
        self.lib.espeak_SetParameter(_ESPEAK_RATE, voice.rate, 0)
        self.lib.espeak_SetParameter(_ESPEAK_PITCH, voice.pitch, 0)
        self.chunks, self.events = [], []
        data = text.encode() + b"\0"
        flags = _ESPEAK_CHARS_UTF8
        err = self.lib.espeak_Synth(data, len(data), 0, _ESPEAK_POS_CHARACTER, 0, flags, None, None)
        if err != 0 or self.lib.espeak_Synchronize() != 0:
            raise SynthError(f"espeak-ng: synthesis failed (error {err}) for {text[:40]!r}")
        pcm = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
        return pcm.astype(np.float32) / 32768.0, self.events


@functools.cache
def _espeak() -> _Espeak:
    """The espeak-ng library, initialised once per process."""
    return _Espeak()


def _espeak_words(text: str, events: list[tuple[int, int]], end_s: float) -> list[WordTiming]:
    """Word timings from events: the first event inside a token starts it; the next ends it."""
    spans = [(m.start(), m.end(), _clean(m.group())) for m in _WORD_RE.finditer(text)]
    starts: dict[int, float] = {}
    for pos, ms in events:
        for i, (a, b, word) in enumerate(spans):
            if a <= pos - 1 < b and word and i not in starts:
                starts[i] = ms / 1000.0
    order = sorted(starts)
    times = [starts[i] for i in order] + [end_s]
    return [WordTiming(spans[i][2], times[k], times[k + 1]) for k, i in enumerate(order)]


def _espeak_synthesize(text: str, voice: Voice, sample_rate: int) -> Utterance:
    """espeak-ng speech for `text` with word timings."""
    engine = _espeak()
    audio, events = engine.synth(text, voice)
    words = _espeak_words(text, events, len(audio) / engine.rate)
    return Utterance(_finish(words, audio, engine.rate, sample_rate), words, text, voice)


def espeak_variants() -> list[str]:
    """Names of the installed espeak-ng voice variants (m1, f2, klatt, ...)."""
    folder = _espeak().data_dir() / "voices" / "!v"
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def espeak_voices() -> list[Voice]:
    """Every installed English accent crossed with every variant (default rate and pitch)."""
    folder = _espeak().data_dir() / "lang" / "gmw"
    names = {p.name.lower() for p in folder.iterdir()} if folder.is_dir() else set()
    accents = [a for a in ESPEAK_ACCENTS if a in names]
    variants = ["", *espeak_variants()]
    return [Voice("espeak", a, v) for a in accents for v in variants]


# ---------------------------------------------------------------- flite


class _FliteWave(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_char_p),
        ("sample_rate", ctypes.c_int),
        ("num_samples", ctypes.c_int),
        ("num_channels", ctypes.c_int),
        ("samples", ctypes.POINTER(ctypes.c_short)),
    ]


class _FliteVoiceHead(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("features", ctypes.c_void_p)]


_WORD_START = b"R:SylStructure.daughter1.daughter1.R:Segment.p.end"
_WORD_END = b"R:SylStructure.daughtern.daughtern.R:Segment.end"


class _Flite:
    """libflite with its voices registered on first use; word times read from the utterance."""

    def __init__(self) -> None:
        lib = self.lib = _load("flite")
        vp, cp = ctypes.c_void_p, ctypes.c_char_p
        signatures = {
            "flite_synth_text": ([cp, vp], vp),
            "utt_wave": ([vp], ctypes.POINTER(_FliteWave)),
            "utt_relation": ([vp, cp], vp),
            "relation_head": ([vp], vp),
            "item_next": ([vp], vp),
            "item_daughter": ([vp], vp),
            "item_last_daughter": ([vp], vp),
            "item_feat_string": ([vp, cp], cp),
            "ffeature_float": ([vp, cp], ctypes.c_float),
            "delete_utterance": ([vp], None),
            "feat_set_float": ([vp, cp, ctypes.c_float], None),
        }
        for name, (args, res) in signatures.items():
            getattr(lib, name).argtypes, getattr(lib, name).restype = args, res
        lib.flite_init()
        self.voices: dict[str, int] = {}

    def voice(self, name: str) -> int:
        """The registered cst_voice pointer for `name` (slt, rms, awb, kal16)."""
        if name not in self.voices:
            if name not in FLITE_VOICES:
                raise SynthError(f"flite: unknown voice {name!r} (have {', '.join(FLITE_VOICES)})")
            register = getattr(_load(f"flite_cmu_us_{name}"), f"register_cmu_us_{name}")
            register.argtypes, register.restype = [ctypes.c_char_p], ctypes.c_void_p
            self.voices[name] = register(None)
        return self.voices[name]

    def _configure(self, voice: Voice) -> int:
        """Apply rate (as duration stretch) and pitch (as an F0 shift) to the voice."""
        ptr = self.voice(voice.name)
        features = ctypes.cast(ptr, ctypes.POINTER(_FliteVoiceHead)).contents.features
        self.lib.feat_set_float(features, b"duration_stretch", DEFAULT_RATE / voice.rate)
        f0 = 100.0 if voice.name != "slt" else 170.0
        self.lib.feat_set_float(
            features, b"int_f0_target_mean", f0 * 2 ** ((voice.pitch - 50) / 100)
        )
        return ptr

    def _words(self, utt: int) -> list[WordTiming]:
        """One timing per text token, spanning the words flite expanded it into."""
        lib, out = self.lib, []
        tok = lib.relation_head(lib.utt_relation(utt, b"Token"))
        while tok:
            first, last = lib.item_daughter(tok), lib.item_last_daughter(tok)
            word = _clean((lib.item_feat_string(tok, b"name") or b"").decode())
            if first and word:
                start = lib.ffeature_float(first, _WORD_START)
                out.append(WordTiming(word, start, lib.ffeature_float(last, _WORD_END)))
            tok = lib.item_next(tok)
        return out

    def synth(self, text: str, voice: Voice) -> tuple[np.ndarray, int, list[WordTiming]]:
        """Samples (float32), their rate and the word timings for `text`."""
        utt = self.lib.flite_synth_text(text.encode(), self._configure(voice))
        if not utt:
            raise SynthError(f"flite: synthesis failed for {text[:40]!r}")
        try:
            wave = self.lib.utt_wave(utt).contents
            n = wave.num_samples * wave.num_channels
            pcm = np.ctypeslib.as_array(wave.samples, shape=(n,)).astype(np.float32) / 32768.0
            return pcm, wave.sample_rate, self._words(utt)
        finally:
            self.lib.delete_utterance(utt)


@functools.cache
def _flite() -> _Flite:
    """libflite, initialised once per process."""
    return _Flite()


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"))


def _flite_synthesize(text: str, voice: Voice, sample_rate: int) -> Utterance:
    """flite speech for `text` with word timings."""
    _libc().srand(0)  # the clustergen voices draw their noise excitation from rand()
    audio, rate, words = _flite().synth(text, voice)
    return Utterance(_finish(words, audio, rate, sample_rate), words, text, voice)


def flite_voices() -> list[Voice]:
    """The installed flite voices (US English), at default rate and pitch."""
    return [
        Voice("flite", name)
        for name in FLITE_VOICES
        if ctypes.util.find_library(f"flite_cmu_us_{name}")
    ]


# ---------------------------------------------------------------- public entry points

ENGINES = ("espeak", "flite")


def voices(engine: str) -> list[Voice]:
    """The voices of `engine` ('espeak' or 'flite')."""
    if engine == "espeak":
        return espeak_voices()
    if engine == "flite":
        return flite_voices()
    raise SynthError(f"unknown speech engine {engine!r} (choose from {', '.join(ENGINES)})")


def synthesize(text: str, voice: Voice, sample_rate: int = 24000) -> Utterance:
    """Speak `text` with `voice`: float32 mono audio at `sample_rate` and word timings.
    With flite the same text and voice always give the same audio; espeak-ng's timing
    varies by a few milliseconds from call to call."""
    if not text.strip():
        raise SynthError("nothing to synthesize: empty text")
    if voice.engine == "espeak":
        return _espeak_synthesize(text, voice, sample_rate)
    if voice.engine == "flite":
        return _flite_synthesize(text, voice, sample_rate)
    raise SynthError(f"unknown speech engine {voice.engine!r} (choose from {', '.join(ENGINES)})")
