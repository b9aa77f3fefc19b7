"""A recorded user turn through the engine: the stereo conversation and the model's text.

    codec, lm, cfg = load_models(checkpoint="runs/r1", codec_checkpoint="mimi.safetensors")
    talk = converse(Engine(codec, lm, slots=1), user_wav_t)
    talk.write("out.wav")   # left: the model, right: the user; out.json: text with times

The model's audio at step t is what it says during the user's frame t (its reply lags by
the LM's delays, as it would live), so the two channels line up as heard in a call.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
from flax import nnx

from sfm.codec.model import Mimi
from sfm.config import Config, load_config, load_stored_config, resolve_preset
from sfm.infer.engine import Engine
from sfm.io.export import MANIFEST
from sfm.io.params import read_config_yaml
from sfm.io.tensors import CheckpointError, PathLike
from sfm.io.weights import load_weights
from sfm.lm.model import LM


@dataclasses.dataclass
class Conversation:
    """The stereo conversation, the model's text tokens with their times, and the speed."""

    stereo_tc: np.ndarray  # float32 [T, 2]: model (left), user (right)
    sample_rate: int
    text: list[tuple[float, int, str]]  # (seconds, token id or -1 for a client, piece)
    seconds: float  # wall time of the steps
    frames: int

    @property
    def real_time_factor(self) -> float:
        """Wall time / audio time (< 1: faster than real time)."""
        return self.seconds / (self.stereo_tc.shape[0] / self.sample_rate)

    def write(self, wav: PathLike) -> Path:
        """WAV at `wav` and the text as JSON beside it (same name, .json); returns the JSON."""
        sf.write(str(wav), self.stereo_tc, self.sample_rate, subtype="FLOAT")
        text = Path(wav).with_suffix(".json")
        words = [{"time_s": round(t, 3), "token": i, "piece": p} for t, i, p in self.text]
        text.write_text(json.dumps({"channels": ["model", "user"], "text": words}, indent=1))
        return text


def _run_config(
    checkpoint: PathLike | None, config: str | None, overrides: Sequence[str]
) -> Config:
    """--config (an lm preset, or a YAML), else the checkpoint's stored config."""
    if config is not None:
        return load_config(resolve_preset(config, "lm"), overrides)
    if checkpoint is None:
        raise CheckpointError("give --checkpoint (sfm weights or a run) or --config (a preset)")
    weights = Path(checkpoint)
    if weights.is_dir():
        weights = weights / "lm.safetensors"
    stored = read_config_yaml(weights) if weights.is_file() else None
    if stored is None:
        raise CheckpointError(
            f"{checkpoint}: no stored config (a Moshi checkpoint?): give --config moshi_7b"
        )
    return load_stored_config(stored, str(weights), overrides)


def load_models(
    checkpoint: PathLike | None = None,
    config: str | None = None,
    codec_checkpoint: PathLike | None = None,
    overrides: Sequence[str] = (),
    seed: int = 0,
) -> tuple[Mimi, LM, Config]:
    """The codec and LM to serve: the config of `config` or of the checkpoint; LM weights from
    `checkpoint` (an sfm file, run, export folder or Moshi file), codec weights from
    `codec_checkpoint`; random weights where none is given."""
    cfg = _run_config(checkpoint, config, overrides)
    codec, lm = Mimi(cfg.codec, rngs=nnx.Rngs(seed)), LM(cfg.lm, rngs=nnx.Rngs(seed + 1))
    if checkpoint is not None:
        path = Path(checkpoint)
        is_run = path.is_dir() and not (path / MANIFEST).exists()  # an export is verified
        load_weights(lm, path / "lm.safetensors" if is_run else path)
    if codec_checkpoint is not None:
        load_weights(codec, codec_checkpoint)
    return codec, lm, cfg


def converse(
    engine: Engine, user_t: np.ndarray, pieces: Sequence[str] | None = None, pad_ids: tuple = ()
) -> Conversation:
    """Run the mono user audio through one engine slot, frame by frame (the last frame padded
    with silence); text tokens in `pad_ids` are left out, `pieces` names the others."""
    return converse_many(engine, [user_t], pieces, pad_ids)[0]


def converse_many(
    engine: Engine,
    users: Sequence[np.ndarray],
    pieces: Sequence[str] | None = None,
    pad_ids: tuple = (),
    progress: Callable[[int], object] | None = None,
) -> list[Conversation]:
    """`converse` for many recorded users at once: each takes a slot as one frees up and all
    the busy slots step together (a conversation's `seconds` is the wall time of the steps
    it was in). `progress(n)` is called as n conversations finish."""
    n = engine.frame_size
    padded = []
    for i, user_t in enumerate(users):
        if len(user_t) == 0:
            raise ValueError(f"conversation {i}: the user's audio is empty")
        user = np.zeros(-(-len(user_t) // n) * n, np.float32)
        user[: len(user_t)] = user_t
        padded.append(user)
    if not engine.busy.any():
        engine.warm_up()  # compile outside the timed frames
    model = [np.zeros_like(u) for u in padded]
    text: list[list[tuple[float, int, str]]] = [[] for _ in users]
    seconds = [0.0] * len(users)
    waiting, active = list(range(len(users))), {}  # active: slot -> (conversation, frame)
    try:
        while waiting or active:
            while waiting and not engine.busy.all():
                active[engine.join()] = (waiting.pop(0), 0)
            if not active:
                raise RuntimeError(f"all {engine.slots} slots are busy with other sessions")
            frames = {s: padded[i][t * n : (t + 1) * n] for s, (i, t) in active.items()}
            t0 = time.perf_counter()
            out = engine.step(frames)
            dt = time.perf_counter() - t0
            for slot, (i, t) in list(active.items()):
                model[i][t * n : (t + 1) * n] = out.audio[slot]
                seconds[i] += dt
                token = int(out.text[slot])
                if out.valid[slot] and token not in pad_ids:
                    piece = pieces[token] if pieces is not None and token < len(pieces) else ""
                    text[i].append((t * n / engine.sample_rate, token, piece))
                if (t + 1) * n >= len(padded[i]):
                    engine.leave(slot)
                    del active[slot]
                    if progress is not None:
                        progress(1)
                else:
                    active[slot] = (i, t + 1)
    finally:
        for slot in active:  # an error part way: free what this call took
            engine.leave(slot)
    return [
        Conversation(np.stack([m, u], axis=1), engine.sample_rate, txt, sec, len(u) // n)
        for m, u, txt, sec in zip(model, padded, text, seconds)
    ]
