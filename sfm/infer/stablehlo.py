"""The engine as StableHLO: `sfm export SOURCE OUT --format stablehlo`.

Three functions of the engine are serialized with `jax.export`, each lowered for cpu, cuda
and tpu in one artifact and each taking the batch (number of slots) as a symbolic dimension
`b`, chosen by the caller at run time. Weights are arguments, not constants, so an artifact
stays small for a 7B model; they travel beside it in `weights.safetensors`. Every argument
and result is a flat list of arrays (the streaming state too), so running an export needs
JAX and safetensors and nothing of sfm:

    init(weights, key_data [b, 2] uint32)                  -> state
    reset(weights, state, mask [b] bool, key_data [b, 2])  -> state (masked slots restarted)
    step(weights, state, wav [b, frame_size] float32)      -> (state, tokens [b, 1 + dep_q]
                                                               int32, audio [b, frame_size]
                                                               float32, valid [b] bool)

`weights` is the tensors of weights.safetensors in the order serving.json lists them;
`key_data` is `jax.random.key_data` of threefry keys (`jax.random.PRNGKey(seed)` rows);
tokens and audio are those of `Engine.step` (-2 and silence until `valid`). A reader:

    import json, jax, numpy as np
    from safetensors.flax import load_file
    serving = json.load(open("OUT/serving.json"))
    tensors = load_file("OUT/weights.safetensors")
    weights = [tensors[name] for name in serving["weights"]]
    init, step = (jax.export.deserialize(open(f"OUT/{f}.jaxexport", "rb").read())
                  for f in ("init", "step"))
    step = jax.jit(step.call, donate_argnums=1)  # the state is updated in place
    state = init.call(weights, np.stack([jax.random.PRNGKey(0)] * 4))
    state, tokens, audio, valid = step(weights, state, np.zeros((4, 1920), np.float32))

Sampling settings are fixed at export (`serving.json` records them). `manifest.json` holds
the SHA-256 of every file (`sfm.io.export.verify_export` checks them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sfm.infer.config import WeightFormat
from sfm.infer.converse import load_models
from sfm.infer.engine import (
    EngineState,
    Models,
    engine_step,
    fresh_state,
    reset_slots,
    serving_models,
)
from sfm.io.export import STABLEHLO_FILES, find_weights, write_export
from sfm.io.tensors import CheckpointError, PathLike, write_tensors
from sfm.lm.generate import SamplingConfig, SlotSampling

PLATFORMS: tuple[str, ...] = ("cpu", "cuda", "tpu")
SERVING, WEIGHTS, *_FUNCTIONS = STABLEHLO_FILES  # serving.json, weights.safetensors, *.jaxexport


class _Wire:
    """The engine's functions over flat lists: weights, state (keys as raw key data)."""

    def __init__(self, models: Models, leaves: tuple, sampling: SamplingConfig) -> None:
        self.models, self.sampling = models, sampling
        flat, self.weights_def = jax.tree.flatten(leaves)
        self.weights = [np.asarray(x) for x in flat]
        self.state_def: Any = None  # set by the first trace of `init`

    def _leaves(self, weights: list) -> tuple:
        return jax.tree.unflatten(self.weights_def, weights)

    def _out(self, state: EngineState) -> list:
        keys = jax.random.key_data(state.gen.keys)
        flat, self.state_def = jax.tree.flatten(state._replace(gen=state.gen._replace(keys=keys)))
        return flat

    def _in(self, flat: list) -> EngineState:
        state = jax.tree.unflatten(self.state_def, flat)
        return state._replace(gen=state.gen._replace(keys=jax.random.wrap_key_data(state.gen.keys)))

    def init(self, weights: list, key_data: jax.Array) -> list:
        keys = jax.random.wrap_key_data(key_data)
        sampling = SlotSampling.full(self.sampling, key_data.shape[0])
        models = self.models.build(self._leaves(weights))
        return self._out(fresh_state(*models, keys, None, sampling))

    def reset(self, weights: list, state: list, mask_b: jax.Array, key_data: jax.Array) -> list:
        codec, lm = self.models.build(self._leaves(weights))
        keys = jax.random.wrap_key_data(key_data)
        sampling = SlotSampling.full(self.sampling, key_data.shape[0])
        return self._out(reset_slots(codec, lm, self._in(state), mask_b, keys, sampling))

    def step(self, weights: list, state: list, wav_bf: jax.Array) -> tuple:
        codec, lm = self.models.build(self._leaves(weights))
        new, tokens, audio, valid = engine_step(codec, lm, self.sampling, self._in(state), wav_bf)
        return self._out(new), tokens, audio, valid


def _spec(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def export_engine(
    models: Models,
    leaves: tuple,
    sampling: SamplingConfig,
    frame_size: int,
    platforms: Sequence[str] = PLATFORMS,
) -> tuple[dict[str, bytes], list[np.ndarray]]:
    """The serialized init, reset and step (batch symbolic) and the flat weights."""
    wire = _Wire(models, leaves, sampling)
    (b,) = jax.export.symbolic_shape("b")
    weights = [_spec(x) for x in wire.weights]
    key_data = jax.ShapeDtypeStruct((b, 2), jnp.uint32)
    state = jax.eval_shape(wire.init, weights, key_data)
    args = {
        "init": (weights, key_data),
        "reset": (weights, state, jax.ShapeDtypeStruct((b,), jnp.bool_), key_data),
        "step": (weights, state, jax.ShapeDtypeStruct((b, frame_size), jnp.float32)),
    }
    out = {}
    for name, spec in args.items():
        fn = jax.jit(getattr(wire, name))
        out[name] = jax.export.export(fn, platforms=tuple(platforms))(*spec).serialize()
    return out, wire.weights


def export_stablehlo(
    source: PathLike,
    out: PathLike,
    codec: PathLike | None = None,
    weights: WeightFormat = "float32",
    overrides: Sequence[str] = (),
    tokenizer: PathLike | None = None,
    platforms: Sequence[str] = PLATFORMS,
) -> list[Path]:
    """Export the engine over the run (or sfm weights) at `source`, with the codec of the run
    or `codec` (sfm or Kyutai Mimi), to the new folder `out`; returns the files written.
    The engine samples with the run's own `sampling`, after `overrides` (`sampling.greedy=true`).
    Exported for several platforms, the LM runs its references (`lm.attention_impl=xla`):
    the Pallas kernels lower for one platform each."""
    found = find_weights(source)
    if "lm" not in found:
        raise CheckpointError(f"{os.fspath(source)}: no LM weights (lm.safetensors) to serve")
    codec = codec if codec is not None else found.get("codec")
    if codec is None:
        raise CheckpointError(
            f"{os.fspath(source)}: no codec weights (codec.safetensors): give --codec"
        )
    if len(platforms) > 1:  # Pallas kernels lower for their own platform only
        overrides = [*overrides, "lm.attention_impl=xla"]
    mimi, lm, cfg = load_models(found["lm"], codec_checkpoint=codec, overrides=overrides)
    models, leaves = serving_models(mimi, lm, weights)
    artifacts, flat = export_engine(models, leaves, cfg.sampling, cfg.codec.frame_size, platforms)
    names = [f"w{i:05d}" for i in range(len(flat))]
    serving = {
        "functions": {name: f"{name}.jaxexport" for name in artifacts},
        "platforms": list(platforms),
        "weights": names,
        "weight_format": weights,
        "frame_size": cfg.codec.frame_size,
        "sample_rate": cfg.codec.sample_rate,
        "dep_q": lm.cfg.dep_q,
        "max_delay": lm.cfg.max_delay,
        "text_card": lm.cfg.text_card,
        "card": lm.cfg.card,
        "sampling": dataclasses.asdict(cfg.sampling),
    }

    def write(folder: Path) -> None:
        write_tensors(folder / WEIGHTS, dict(zip(names, flat, strict=True)))
        for name, blob in artifacts.items():
            (folder / f"{name}.jaxexport").write_bytes(blob)
        (folder / SERVING).write_text(json.dumps(serving, indent=2) + "\n")

    return write_export(out, "stablehlo", write, tokenizer)
