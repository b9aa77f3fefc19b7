"""Kyutai's moshi `lm_kwargs` (the LMModel options a checkpoint is built with) <-> LMConfig.

Options that change neither the weights nor the forward pass are ignored; options sfm
reproduces at one value only, and unknown ones, raise InteropError naming the key. moshi
derives the gated MLP width from `hidden_scale * dim` (21/8 of dim at scale 4); sfm from
`dim_feedforward` (2/3 of it): each side is given a number with the other's width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sfm.io.tensors import InteropError
from sfm.lm.config import DepthConfig, LMConfig, TemporalConfig, feedforward_for, gated_hidden

_NORM_EPS = {"rms_norm_f32": 1e-8, "rms_norm": 1e-5}

# LMModel / StreamingTransformer options with no effect on the weights or the forward pass.
_IGNORED = {
    "device", "dtype", "quantize", "gradient_checkpointing", "checkpointing", "extra_heads_dim",
    "depformer_context", "depformer_max_period", "depformer_causal", "positional_scale",
    "depformer_positional_scale", "betas", "lora_rank", "lora_scaling", "activation",
}  # fmt: skip
# Options sfm reproduces only at one value (moshi's default when absent is the second item).
_REQUIRED: dict[str, tuple[Any, Any]] = {
    "causal": (True, True),
    "gating": ("silu", "none"),
    "positional_embedding": ("rope", "sin"),
    "depformer_pos_emb": ("none", "sin"),
    "depformer_multi_linear": (True, False),
    "depformer_weights_per_step": (True, False),
    "layer_scale": (None, None),
    "text_card_out": (None, None),
    "demux_second_text_stream": (False, False),
    "demux_second_stream": (False, False),
    "norm_emb": (False, False),
    "bias_proj": (False, False),
    "depformer_low_rank_embeddings": (None, None),
    "depformer_norm": (None, None),
    "extra_heads_num_heads": (0, 0),
    "cross_attention": (False, False),
    "skip_self_attn": (False, False),
    "weights_per_step": (0, 0),
    "conditioners": (None, None),
    "condition_provider": (None, None),
    "fuser": (None, None),
    "lora": (False, False),
}
_MAPPED = {
    "dim", "num_heads", "num_layers", "hidden_scale", "context", "max_period", "kv_repeat",
    "norm", "n_q", "dep_q", "card", "text_card", "delays", "existing_text_padding_id",
    "existing_text_end_padding_id", "depformer_dim", "depformer_num_heads",
    "depformer_num_layers", "depformer_dim_feedforward", "depformer_kv_repeat",
    "depformer_gating", "depformer_layer_scale", "depformer_weights_per_step_schedule",
}  # fmt: skip


def _unsupported(key: str, value: Any, why: str) -> InteropError:
    return InteropError(f"moshi LM option {key}={value!r}: {why}")


def _moshi_hidden(dim: int, dim_feedforward: int) -> int:
    """Gated hidden width moshi derives from dim_feedforward (21/8 of dim when it is 4 * dim)."""
    return 21 * dim // 8 if dim_feedforward == 4 * dim else 2 * dim_feedforward // 3


def _sfm_feedforward(dim: int, dim_feedforward: int) -> int:
    """An sfm dim_feedforward whose gated hidden width equals moshi's."""
    hidden = _moshi_hidden(dim, dim_feedforward)
    return dim_feedforward if gated_hidden(dim_feedforward) == hidden else feedforward_for(hidden)


def _check_options(kw: Mapping[str, Any]) -> None:
    for key, value in kw.items():
        if key in _REQUIRED:
            want = _REQUIRED[key][0]
            if value != want and not (key == "text_card_out" and value == kw.get("text_card")):
                raise _unsupported(key, value, f"sfm supports only {want!r}")
        elif key not in _IGNORED and key not in _MAPPED:
            raise _unsupported(key, value, "unknown or unsupported option")
    for key, (want, default) in _REQUIRED.items():
        if key not in kw and want != default:
            raise _unsupported(key, default, f"moshi's default; sfm needs {want!r}")


def _dep(kw: Mapping[str, Any], name: str, default: Any) -> Any:
    """A depformer option: `depformer_<name>`, else the main transformer's, else the default."""
    return kw.get(f"depformer_{name}", kw.get(name, default))


def _kv_heads(key: str, heads: int, repeat: int) -> int | None:
    """sfm's num_kv_heads for moshi's kv_repeat (None: one kv head per query head)."""
    if repeat < 1 or heads % repeat:
        raise _unsupported(key, repeat, f"must divide num_heads={heads}")
    return heads // repeat if repeat > 1 else None


def _temporal(kw: Mapping[str, Any], eps: float) -> TemporalConfig:
    dim, heads = kw["dim"], kw["num_heads"]
    if kw.get("context") is None:
        raise _unsupported("context", None, "sfm needs a finite attention context")
    return TemporalConfig(
        dim=dim,
        num_heads=heads,
        num_kv_heads=_kv_heads("kv_repeat", heads, kw.get("kv_repeat", 1)),
        num_layers=kw["num_layers"],
        dim_feedforward=_sfm_feedforward(dim, int(kw.get("hidden_scale", 4) * dim)),
        context=kw["context"],
        max_period=float(kw.get("max_period", 10_000)),
        norm_eps=eps,
    )


def _depth(kw: Mapping[str, Any], eps: float) -> DepthConfig:
    dim, heads = kw.get("depformer_dim", 256), kw["depformer_num_heads"]
    for name in ("gating", "layer_scale"):
        value, want = _dep(kw, name, _REQUIRED[name][1]), _REQUIRED[name][0]
        if value != want:
            raise _unsupported(f"depformer_{name}", value, f"sfm supports only {want!r}")
    schedule = kw.get("depformer_weights_per_step_schedule")
    if schedule is not None and list(schedule) != list(range(kw["dep_q"])):
        raise _unsupported("depformer_weights_per_step_schedule", schedule, "steps share weights")
    dff = kw.get("depformer_dim_feedforward")
    dff = int(kw.get("hidden_scale", 4) * dim) if dff is None else dff
    if isinstance(dff, list | tuple):
        if len(set(dff)) != 1:
            raise _unsupported("depformer_dim_feedforward", dff, "differs between steps")
        dff = dff[0]
    return DepthConfig(
        kind="moshi",
        dim=dim,
        num_heads=heads,
        num_kv_heads=_kv_heads("depformer_kv_repeat", heads, _dep(kw, "kv_repeat", 1)),
        num_layers=_dep(kw, "num_layers", None),
        dim_feedforward=_sfm_feedforward(dim, dff),
        max_period=None,
        norm_eps=eps,
    )


def lm_config_from_moshi(lm_kwargs: Mapping[str, Any], **overrides: Any) -> LMConfig:
    """The sfm config of a moshi `LMModel` built from `lm_kwargs` (`loaders._lm_kwargs` style).

    moshi's `n_q` counts both speakers' codebooks; sfm's counts one side. Options sfm cannot
    reproduce raise InteropError naming the key. `overrides` set other LMConfig fields."""
    kw = dict(lm_kwargs)
    _check_options(kw)
    norm = kw.get("norm", "layer_norm")
    if norm not in _NORM_EPS:
        raise _unsupported("norm", norm, f"sfm supports {sorted(_NORM_EPS)}")
    n_q, dep_q = kw.get("n_q", 8), kw.get("dep_q", 8)
    if n_q % 2 or not 1 <= dep_q <= n_q // 2:
        raise _unsupported("n_q", n_q, f"must be even with 1 <= dep_q={dep_q} <= n_q / 2")
    try:
        return LMConfig(
            text_card=kw.get("text_card", 32000),
            card=kw.get("card", 1024),
            n_q=n_q // 2,
            dep_q=dep_q,
            delays=tuple(kw.get("delays", [0])),
            text_pad=kw.get("existing_text_padding_id", 3),
            text_epad=kw.get("existing_text_end_padding_id", 0),
            temporal=_temporal(kw, _NORM_EPS[norm]),
            depth=_depth(kw, _NORM_EPS[norm]),
            **overrides,
        )
    except ValueError as exc:  # LMConfig's own checks (delays, heads)
        raise InteropError(f"moshi LM options: {exc}") from None


def _moshi_feedforward(dim: int, dim_feedforward: int) -> int:
    """A moshi dim_feedforward with the gated width of sfm's (preferably the same number)."""
    hidden = gated_hidden(dim_feedforward)
    for dff in (dim_feedforward, feedforward_for(hidden), 3 * hidden // 2 + 1):
        if _moshi_hidden(dim, dff) == hidden:
            return dff
    raise InteropError(f"no moshi dim_feedforward gives a gated width of {hidden}")


def _hidden_scale(dim: int, dff: int) -> float:
    """A float s with int(s * dim) == dff."""
    scale = dff / dim
    while int(scale * dim) < dff:
        scale = math.nextafter(scale, math.inf)
    return scale


def moshi_lm_kwargs(cfg: LMConfig) -> dict[str, Any]:
    """`lm_kwargs` for moshi's `get_moshi_lm` that build an LMModel equivalent to `cfg`."""
    t, d = cfg.temporal, cfg.depth
    if d.kind != "moshi" or d.max_period is not None:
        raise InteropError("lm.depth: only the Moshi depformer (no positions) exists in moshi")
    eps = {v: k for k, v in _NORM_EPS.items()}
    if t.norm_eps != d.norm_eps or t.norm_eps not in eps:
        raise InteropError(f"lm norm_eps {t.norm_eps}, {d.norm_eps}: moshi has 1e-8 or 1e-5")
    return {
        "dim": t.dim,
        "text_card": cfg.text_card,
        "existing_text_padding_id": cfg.text_pad,
        "existing_text_end_padding_id": cfg.text_epad,
        "n_q": 2 * cfg.n_q,
        "dep_q": cfg.dep_q,
        "card": cfg.card,
        "num_heads": t.num_heads,
        "num_layers": t.num_layers,
        "hidden_scale": _hidden_scale(t.dim, _moshi_feedforward(t.dim, t.dim_feedforward)),
        "kv_repeat": t.num_heads // t.kv_heads,
        "causal": True,
        "layer_scale": None,
        "context": t.context,
        "max_period": t.max_period,
        "gating": "silu",
        "norm": eps[t.norm_eps],
        "positional_embedding": "rope",
        "depformer_dim": d.dim,
        "depformer_dim_feedforward": _moshi_feedforward(d.dim, d.dim_feedforward),
        "depformer_num_heads": d.num_heads,
        "depformer_num_layers": d.num_layers,
        "depformer_kv_repeat": d.num_heads // d.kv_heads,
        "depformer_layer_scale": None,
        "depformer_multi_linear": True,
        "depformer_gating": "silu",
        "depformer_pos_emb": "none",
        "depformer_weights_per_step": True,
        "delays": list(cfg.delays),
    }
