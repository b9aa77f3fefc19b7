"""Start the temporal transformer from a text LM: Llama-style checkpoints (Hugging Face names).

Moshi starts its temporal transformer from a pretrained text LM (Helium). This reads a Llama-
architecture safetensors file (Llama, Mistral, Helium, SmolLM, ...: pre-norm RMSNorm, RoPE,
grouped-query attention without biases, SiLU-gated MLP) into an sfm `LM` whose temporal
config matches (`temporal_config_from_llama` derives it from the model's config.json). The
audio embeddings and the depth transformer keep their initialisation.

| Llama key (per layer i)                          | sfm parameter (layer i)                  |
|--------------------------------------------------|------------------------------------------|
| model.embed_tokens.weight [V, D]                 | text_emb.embedding rows 0..V-1           |
| model.layers.i.input_layernorm.weight            | transformer.layers.norm1.alpha           |
| model.layers.i.self_attn.{q,k,v}_proj.weight     | transformer.layers.self_attn.in_proj     |
|                                                  | (rows [q | k | v]; q, k rows reordered)  |
| model.layers.i.self_attn.o_proj.weight           | transformer.layers.self_attn.out_proj    |
| model.layers.i.post_attention_layernorm.weight   | transformer.layers.norm2.alpha           |
| model.layers.i.mlp.{gate,up}_proj.weight         | transformer.layers.gating.linear_in      |
|                                                  | (rows [gate | up])                       |
| model.layers.i.mlp.down_proj.weight              | transformer.layers.gating.linear_out     |
| model.norm.weight                                | out_norm.alpha                           |
| lm_head.weight (tied: embed_tokens)              | text_linear                              |

`path` is a safetensors file, a sharded checkpoint's `model.safetensors.index.json`, or the
model's folder (with config.json). The whole checkpoint is read into host memory.

RoPE: Llama and Mistral rotate the two halves of each head (`rotate_half`), sfm (as Moshi and
Helium) adjacent pairs; for a halves model the q and k rows of each head are reordered so that
half-dims i and i + d/2 become the pair (2i, 2i + 1), which gives the same attention scores.
Which convention a checkpoint uses comes from `model_type` in the config.json beside it
(no config.json: Llama's). With a config.json its RoPE base and norm epsilon are checked
against `lm.temporal`. The LM config must match the checkpoint: `temporal_config_from_llama`
derives `lm.temporal`; `lm.text_card` is the vocabulary size V; `lm.text_pad` and
`lm.text_epad` name two ids of that vocabulary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfm.io.tensors import InteropError, PathLike, read_tensors, widen
from sfm.lm.config import TemporalConfig, feedforward_for
from sfm.lm.model import LM

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints store
INTERLEAVED_ROPE = frozenset({"helium"})  # model types that rotate adjacent pairs already


def temporal_config_from_llama(config: Mapping[str, Any], **overrides: Any) -> TemporalConfig:
    """The temporal config of a Llama-style model's config.json (`overrides`: other fields,
    e.g. the attention `context`, which Llama does not bound; Mistral's sliding window is
    its default)."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    try:
        dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        hidden = int(config["intermediate_size"])
        fields: dict[str, Any] = dict(
            dim=dim,
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            num_layers=int(config["num_hidden_layers"]),
            dim_feedforward=feedforward_for(hidden),
            max_period=float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        )
        if config.get("sliding_window"):
            fields["context"] = int(config["sliding_window"])
    except (KeyError, TypeError, ValueError) as err:
        raise InteropError(f"text LM config: missing or bad key {err}") from None
    if config.get("head_dim") not in (None, dim // heads):
        raise InteropError(f"text LM config: head_dim {config['head_dim']} != hidden/heads")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise InteropError("text LM config: attention or MLP biases are not supported")
    if rope.get("rope_type", "default") != "default":
        raise InteropError(f"text LM config: rope_type {rope['rope_type']!r} is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise InteropError(f"text LM config: hidden_act {config['hidden_act']!r}: sfm has silu")
    try:
        return TemporalConfig(**{**fields, **overrides})
    except TypeError as err:
        raise InteropError(f"text LM config overrides: {err}") from None


def _checkpoint(path: PathLike) -> tuple[list[Path], dict[str, Any] | None]:
    """The safetensors files of a checkpoint and its config.json (None when absent)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    index = p if p.name.endswith(".index.json") else folder / "model.safetensors.index.json"
    if p.is_dir() and not index.is_file():
        p = folder / "model.safetensors"
    if p.is_dir() or p == index:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InteropError(f"{index}: not a readable checkpoint index ({err})") from None
        files = [folder / shard for shard in shards]
    else:
        files = [p]
    config = None
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except ValueError as err:
            raise InteropError(f"{folder / 'config.json'}: not JSON ({err})") from None
    return files, config


def _rope_rows(w_out_in: np.ndarray, head_dim: int) -> np.ndarray:
    """Reorder each head's rows from Llama's halves to sfm's adjacent pairs."""
    half = head_dim // 2
    perm = np.arange(head_dim).reshape(2, half).T.reshape(-1)  # 0, d/2, 1, d/2+1, ...
    heads = w_out_in.reshape(-1, head_dim, w_out_in.shape[-1])
    return heads[:, perm].reshape(w_out_in.shape)


class _Reader:
    """The checkpoint's tensors, each taken once (as float32) and checked against the shape
    sfm needs."""

    def __init__(self, path: PathLike, files: list[Path]) -> None:
        self.path = os.fspath(path)
        self.tensors: dict[str, np.ndarray] = {}
        for file in files:
            found = read_tensors(file)
            self.tensors |= {k: v for k, v in found.items() if not k.endswith(_IGNORED_SUFFIXES)}
        self.used: set[str] = set()

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.tensors:
            raise InteropError(
                f"{self.path}: missing key {key} (not a Llama-style text LM, or one shard of"
                " one: pass its folder or index)"
            )
        value = self.tensors[key]
        if value.shape != shape:
            raise InteropError(
                f"{self.path}: {key} has shape {value.shape}, the LM config needs {shape}"
            )
        self.used.add(key)
        return widen(value)

    def check_all_used(self) -> None:
        extra = sorted(set(self.tensors) - self.used)
        if extra:
            raise InteropError(f"{self.path}: {len(extra)} unexpected keys, first {extra[0]}")


def _layer(r: _Reader, i: int, t: TemporalConfig, halves: bool) -> dict[str, np.ndarray]:
    """Layer i's parameters in sfm's layout (single weight set: leading axis 1)."""
    p, d, hd = f"model.layers.{i}", t.dim, t.dim // t.num_heads
    q = r.take(f"{p}.self_attn.q_proj.weight", (t.num_heads * hd, d))
    k = r.take(f"{p}.self_attn.k_proj.weight", (t.kv_heads * hd, d))
    if halves:
        q, k = _rope_rows(q, hd), _rope_rows(k, hd)
    v = r.take(f"{p}.self_attn.v_proj.weight", (t.kv_heads * hd, d))
    gate = r.take(f"{p}.mlp.gate_proj.weight", (t.hidden, d))
    up = r.take(f"{p}.mlp.up_proj.weight", (t.hidden, d))
    return {
        "norm1": r.take(f"{p}.input_layernorm.weight", (d,)),
        "in_proj": np.concatenate([q, k, v])[None],
        "out_proj": r.take(f"{p}.self_attn.o_proj.weight", (d, t.num_heads * hd))[None],
        "norm2": r.take(f"{p}.post_attention_layernorm.weight", (d,)),
        "linear_in": np.concatenate([gate, up])[None],
        "linear_out": r.take(f"{p}.mlp.down_proj.weight", (d, t.hidden))[None],
    }


def _targets(layer: nnx.Module) -> dict[str, nnx.Variable]:
    return {
        "norm1": layer.norm1.alpha,
        "in_proj": layer.self_attn.in_proj.kernel,
        "out_proj": layer.self_attn.out_proj.kernel,
        "norm2": layer.norm2.alpha,
        "linear_in": layer.gating.linear_in.kernel,
        "linear_out": layer.gating.linear_out.kernel,
    }


def _set(var: nnx.Variable, value: np.ndarray) -> None:
    old = var.get_value()
    if tuple(old.shape) != value.shape:  # the key map and the model disagree: a bug, not input
        raise AssertionError(f"shape {value.shape} for a parameter of shape {old.shape}")
    var.set_value(jnp.asarray(value, old.dtype))


def _check_config(path: PathLike, config: Mapping[str, Any], t: TemporalConfig) -> None:
    """InteropError naming the key when the checkpoint's RoPE base or norm epsilon is not the
    LM config's (shapes are checked tensor by tensor)."""
    want = temporal_config_from_llama(config)
    for name in ("max_period", "norm_eps"):
        if not np.isclose(getattr(want, name), getattr(t, name), rtol=1e-6, atol=0):
            raise InteropError(
                f"{os.fspath(path)}: the checkpoint's config has {name} {getattr(want, name)}, "
                f"lm.temporal.{name} is {getattr(t, name)}"
            )


def load_text_lm(model: LM, path: PathLike) -> None:
    """Load a Llama-style text LM into `model`'s text embedding, temporal transformer and
    text head (see the module docstring); the rest of `model` is left as it is."""
    files, config = _checkpoint(path)
    r, cfg = _Reader(path, files), model.cfg
    t = cfg.temporal
    if config is not None:
        _check_config(path, config, t)
    halves = (config or {}).get("model_type") not in INTERLEAVED_ROPE
    vocab = r.tensors.get("model.embed_tokens.weight", np.empty((cfg.text_card, 0))).shape[0]
    if vocab != cfg.text_card:
        raise InteropError(f"{r.path}: a vocabulary of {vocab}, lm.text_card is {cfg.text_card}")
    embed = r.take("model.embed_tokens.weight", (cfg.text_card, t.dim))
    head = r.take("lm_head.weight", embed.shape) if "lm_head.weight" in r.tensors else embed
    layers = [_layer(r, i, t, halves) for i in range(t.num_layers)]
    final_norm = r.take("model.norm.weight", (t.dim,))
    r.check_all_used()

    table = np.array(model.text_emb.embedding.get_value(), np.float32)
    table[: cfg.text_card] = embed
    _set(model.text_emb.embedding, table)
    _set(model.text_linear.kernel, head[None])
    _set(model.out_norm.alpha, final_norm)
    stack = model.transformer
    if stack.scan_layers:
        for name, var in _targets(stack.layers).items():
            _set(var, np.stack([layer[name] for layer in layers]))
    else:
        for module, values in zip(stack.layers, layers, strict=True):
            for name, var in _targets(module).items():
                _set(var, values[name])
