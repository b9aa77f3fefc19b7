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

RoPE: Llama rotates the two halves of each head (`rotate_half`), sfm (as Moshi) adjacent
pairs; the q and k rows of each head are reordered so that half-dims i and i + d/2 become the
pair (2i, 2i + 1), which gives the same attention scores. The text vocabulary must be the
checkpoint's (`lm.text_card` = V); `lm.text_pad` / `lm.text_epad` name two of its ids.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfm.io.tensors import InteropError, PathLike, read_tensors, widen
from sfm.lm.config import TemporalConfig
from sfm.lm.model import LM

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints store


def temporal_config_from_llama(config: Mapping[str, Any], **overrides: Any) -> TemporalConfig:
    """The temporal config of a Llama-style model's config.json (`overrides`: other fields,
    e.g. the attention `context`, which Llama does not bound)."""
    try:
        dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        hidden = int(config["intermediate_size"])
        fields: dict[str, Any] = dict(
            dim=dim,
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            num_layers=int(config["num_hidden_layers"]),
            dim_feedforward=(3 * hidden + 1) // 2,  # whose gated width (2/3) is `hidden`
            max_period=float(config.get("rope_theta", 10000.0)),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise InteropError(f"text LM config: missing or bad key {err}") from None
    if config.get("head_dim") not in (None, dim // heads):
        raise InteropError(f"text LM config: head_dim {config['head_dim']} != hidden/heads")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise InteropError("text LM config: attention or MLP biases are not supported")
    if config.get("rope_scaling"):
        raise InteropError("text LM config: rope_scaling is not supported")
    return TemporalConfig(**{**fields, **overrides})


def _rope_rows(w_out_in: np.ndarray, head_dim: int) -> np.ndarray:
    """Reorder each head's rows from Llama's halves to sfm's adjacent pairs."""
    half = head_dim // 2
    perm = np.arange(head_dim).reshape(2, half).T.reshape(-1)  # 0, d/2, 1, d/2+1, ...
    heads = w_out_in.reshape(-1, head_dim, w_out_in.shape[-1])
    return heads[:, perm].reshape(w_out_in.shape)


class _Reader:
    """The checkpoint's tensors, each taken once and checked against the shape sfm needs."""

    def __init__(self, path: PathLike) -> None:
        self.path = os.fspath(path)
        self.tensors = {
            k: widen(v) for k, v in read_tensors(path).items() if not k.endswith(_IGNORED_SUFFIXES)
        }
        self.used: set[str] = set()

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.tensors:
            raise InteropError(f"{self.path}: missing key {key} (is it a Llama-style text LM?)")
        value = self.tensors[key]
        if value.shape != shape:
            raise InteropError(
                f"{self.path}: {key} has shape {value.shape}, the LM config needs {shape}"
            )
        self.used.add(key)
        return value

    def check_all_used(self) -> None:
        extra = sorted(set(self.tensors) - self.used)
        if extra:
            raise InteropError(f"{self.path}: {len(extra)} unexpected keys, first {extra[0]}")


def _layer(r: _Reader, i: int, t: TemporalConfig) -> dict[str, np.ndarray]:
    """Layer i's parameters in sfm's layout (single weight set: leading axis 1)."""
    p, d, hd = f"model.layers.{i}", t.dim, t.dim // t.num_heads
    q = _rope_rows(r.take(f"{p}.self_attn.q_proj.weight", (t.num_heads * hd, d)), hd)
    k = _rope_rows(r.take(f"{p}.self_attn.k_proj.weight", (t.kv_heads * hd, d)), hd)
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


def load_text_lm(model: LM, path: PathLike) -> None:
    """Load a Llama-style text LM into `model`'s text embedding, temporal transformer and
    text head (see the module docstring); the rest of `model` is left as it is."""
    r, cfg = _Reader(path), model.cfg
    t = cfg.temporal
    vocab = r.tensors.get("model.embed_tokens.weight", np.empty((cfg.text_card, 0))).shape[0]
    if vocab != cfg.text_card:
        raise InteropError(f"{r.path}: a vocabulary of {vocab}, lm.text_card is {cfg.text_card}")
    embed = r.take("model.embed_tokens.weight", (cfg.text_card, t.dim))
    head = r.take("lm_head.weight", embed.shape) if "lm_head.weight" in r.tensors else embed
    layers = [_layer(r, i, t) for i in range(t.num_layers)]
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
