"""Import/export Moshi LM weights in Kyutai's safetensors layout.

moshi's `LMModel` stores one tensor per layer (and per depformer step); sfm stacks layers on a
leading axis and depformer steps on a second one, so each sfm parameter gathers many Kyutai
tensors. The key map is derived from the config: a reduced LM converts like the 7B one.
Released checkpoints fuse the per-step attention projections (`self_attn.in_proj_weight`
[steps * out, in]); moshi's own state dict splits them (`self_attn.in_projs.{s}.weight`).
Both are read; the fused form is written by default.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfm.io.tensors import InteropError, read_tensors, widen, write_tensors
from sfm.lm.config import DepthConfig, LMConfig, TemporalConfig, gated_hidden
from sfm.lm.model import LM

Array = np.ndarray
Entry = tuple[str, str, tuple[int, ...], bool]  # (kyutai key, sfm path, slot, is_norm)

_NORM_EPS = {"rms_norm_f32": 1e-8, "rms_norm": 1e-5}
_FUSED = {  # fused Kyutai name -> per-step name (`{s}` is the step)
    "self_attn.in_proj_weight": "self_attn.in_projs.{s}.weight",
    "self_attn.in_proj.weight": "self_attn.in_projs.{s}.weight",
    "self_attn.out_proj.weight": "self_attn.out_projs.{s}.weight",
}

# ---- config ------------------------------------------------------------------------------------

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
    return dim_feedforward if gated_hidden(dim_feedforward) == hidden else (3 * hidden + 1) // 2


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
    for dff in (dim_feedforward, (3 * hidden + 1) // 2, 3 * hidden // 2 + 1):
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


# ---- key map -----------------------------------------------------------------------------------


def _layers(prefix: str, path: str, num_layers: int, steps: int, stacked: bool) -> Iterator[Entry]:
    """Stacked layers (`scan_layers`) hold layer n at slot n of `{path}/layers/...`, the
    others under `{path}/layers/{n}/...`."""
    gating = "gating" if steps == 1 else "gating.{s}"
    for n in range(num_layers):
        t = f"{prefix}.layers.{n}"
        layer, lead = (f"{path}/layers", (n,)) if stacked else (f"{path}/layers/{n}", ())
        attn, mlp = f"{layer}/self_attn", f"{layer}/gating"
        for proj in ("out", "in"):
            for s in range(steps):
                key = f"{t}.self_attn.{proj}_projs.{s}.weight"
                yield key, f"{attn}/{proj}_proj/kernel", (*lead, s), False
        yield f"{t}.norm1.alpha", f"{layer}/norm1/alpha", lead, True
        yield f"{t}.norm2.alpha", f"{layer}/norm2/alpha", lead, True
        for s in range(steps):
            g = gating.format(s=s)
            yield f"{t}.{g}.linear_in.weight", f"{mlp}/linear_in/kernel", (*lead, s), False
            yield f"{t}.{g}.linear_out.weight", f"{mlp}/linear_out/kernel", (*lead, s), False


def key_map(cfg: LMConfig) -> list[Entry]:
    """Every (Kyutai key, sfm path, slot in the sfm array, is_norm) of an LM with this config,
    in the order of moshi's `LMModel.state_dict()`."""
    k, t, d = cfg.dep_q, cfg.temporal, cfg.depth
    return [
        *((f"emb.{i}.weight", f"emb/{i}/embedding", (), False) for i in range(cfg.n_audio)),
        ("text_emb.weight", "text_emb/embedding", (), False),
        ("text_linear.weight", "text_linear/kernel", (0,), False),
        *_layers("transformer", "transformer", t.num_layers, 1, t.scan_layers),
        ("out_norm.alpha", "out_norm/alpha", (), True),
        *((f"depformer_in.{i}.weight", "depth/depformer_in/kernel", (i,), False) for i in range(k)),
        *(
            (f"depformer_emb.{i}.weight", f"depth/emb/{i}/embedding", (), False)
            for i in range(k - 1)
        ),
        ("depformer_text_emb.weight", "depth/text_emb/embedding", (), False),
        *_layers("depformer", "depth/transformer", d.num_layers, k, d.scan_layers),
        *((f"linears.{i}.weight", "depth/linears/kernel", (i,), False) for i in range(k)),
    ]


@functools.lru_cache(maxsize=8)
def _param_shapes(cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    abstract = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return {"/".join(str(p) for p in path): tuple(v.shape) for path, v in flat}


def checkpoint_shapes(cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every Kyutai tensor (per-step keys, as `LMModel.state_dict()`) for `cfg`."""
    shapes = _param_shapes(cfg)
    return {
        tkey: (1, 1, *shapes[path][len(slot) :]) if is_norm else shapes[path][len(slot) :]
        for tkey, path, slot, is_norm in key_map(cfg)
    }


def _split_fused(tensors: Mapping[str, Array], cfg: LMConfig, source: str) -> dict[str, Array]:
    """Replace fused per-step attention projections by one tensor per step."""
    out = dict(tensors)
    for key in list(tensors):
        for fused, split in _FUSED.items():
            if not key.endswith(fused):
                continue
            steps = cfg.dep_q if key.startswith("depformer.") else 1
            w = np.asarray(out.pop(key))
            if w.shape[0] % steps:
                raise InteropError(f"{source}: {key} {w.shape} does not split into {steps} steps")
            for s, part in enumerate(np.split(w, steps)):
                out[key[: -len(fused)] + split.format(s=s)] = part
    return out


def torch_to_sfm(
    tensors: Mapping[str, Array], cfg: LMConfig, *, source: str = "checkpoint"
) -> dict[str, Array]:
    """Kyutai state dict -> {sfm path: float32 array}; fails on missing, unexpected or
    misshapen keys."""
    tensors = _split_fused(tensors, cfg, source)
    shapes = _param_shapes(cfg)
    out = {path: np.empty(shape, np.float32) for path, shape in shapes.items()}
    written: dict[str, set[tuple[int, ...]]] = {path: set() for path in shapes}
    for tkey, path, slot, is_norm in key_map(cfg):
        if tkey not in tensors:
            raise InteropError(f"{source}: missing key {tkey} (does the LM config match?)")
        value = np.asarray(tensors[tkey])
        want = shapes[path][len(slot) :]
        if is_norm and value.shape == (1, 1, *want):
            value = value.reshape(want)
        if value.shape != want:
            raise InteropError(
                f"{source}: {tkey} has shape {value.shape}, the config expects {want} (sfm {path})"
            )
        out[path][slot] = value
        written[path].add(slot)
    _check_written(written, shapes)
    extra = sorted(set(tensors) - {e[0] for e in key_map(cfg)})
    if extra:
        raise InteropError(
            f"{source}: {len(extra)} unexpected keys, first {extra[:3]} "
            "(is the LM config smaller than the checkpoint?)"
        )
    return out


def _check_written(written: dict[str, set[tuple[int, ...]]], shapes: dict) -> None:
    """Every slot of every sfm parameter came from exactly one Kyutai tensor."""
    for path, slots in written.items():
        depth = len(next(iter(slots))) if slots else 0
        if not slots or len(slots) != math.prod(shapes[path][:depth]):
            raise InteropError(f"key map leaves part of sfm parameter {path} unset")


_STEP_KEY = re.compile(r"^(.*\.self_attn\.)(in|out)_projs\.(\d+)\.weight$")


def _fuse(tensors: dict[str, Array]) -> dict[str, Array]:
    """Per-step attention projections -> Kyutai's fused `in_proj_weight`/`out_proj.weight`."""
    out: dict[str, Array] = {}
    groups: dict[str, list[Array]] = {}
    for key, value in tensors.items():
        match = _STEP_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        prefix, kind, _ = match.groups()
        fused = f"{prefix}in_proj_weight" if kind == "in" else f"{prefix}out_proj.weight"
        if fused not in groups:
            groups[fused] = []
            out[fused] = value  # placeholder keeps the key order
        groups[fused].append(value)
    for fused, parts in groups.items():
        out[fused] = np.concatenate(parts)
    return out


def _flat(source: LM | nnx.State | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, LM):
        source = nnx.state(source, nnx.Param)
    if isinstance(source, nnx.State):
        flat = nnx.to_flat_state(source)
        return {"/".join(str(p) for p in path): v.get_value() for path, v in flat}
    return dict(source)


def sfm_to_torch(
    source: LM | nnx.State | Mapping[str, Any], cfg: LMConfig, *, fused: bool = False
) -> dict[str, Array]:
    """sfm LM (model, param State or {path: array}) -> Kyutai state dict of float32 arrays.

    `fused=False` gives the keys of moshi's `LMModel.state_dict()`; `fused=True` those of
    Kyutai's released checkpoints. moshi loads both."""
    flat = {path: np.asarray(value) for path, value in _flat(source).items()}
    extra = sorted(set(flat) - {e[1] for e in key_map(cfg)})
    if extra:  # e.g. LoRA adapters, which moshi's LMModel does not hold
        raise InteropError(f"sfm parameters with no Kyutai key: {extra[:3]} (merge them first)")
    out: dict[str, Array] = {}
    for tkey, path, slot, is_norm in key_map(cfg):
        value = flat[path][slot].astype(np.float32)
        out[tkey] = np.ascontiguousarray(value.reshape(1, 1, -1) if is_norm else value)
    return _fuse(out) if fused else out


# ---- files -------------------------------------------------------------------------------------


def _read(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Array], str]:
    if isinstance(source, str | Path):
        return {k: widen(v) for k, v in read_tensors(source).items()}, str(source)
    tensors = {}
    for key, value in source.items():  # numpy arrays or torch tensors (bf16 widened)
        if hasattr(value, "detach"):
            value = value.detach().float().cpu().numpy()
        tensors[key] = widen(np.asarray(value))
    return tensors, "state dict"


def model_from_flat(flat: Mapping[str, Array], cfg: LMConfig) -> LM:
    """An sfm LM holding these parameters, built without a random initialisation."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0))))
    variables = nnx.to_flat_state(state)
    for path, var in variables:
        abstract = var.get_value()
        var.set_value(jnp.asarray(flat["/".join(str(p) for p in path)], abstract.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(variables))


def import_moshi_lm(
    source: str | Path | Mapping[str, Any],
    cfg: LMConfig | None = None,
    lm_kwargs: Mapping[str, Any] | None = None,
) -> LM:
    """Build an sfm LM from a Kyutai safetensors file or an in-memory state dict.

    The config is `cfg`, else derived from moshi's `lm_kwargs`, else Moshi 7B (LMConfig())."""
    if cfg is not None and lm_kwargs is not None:
        raise ValueError("pass either cfg or lm_kwargs, not both")
    if cfg is None:
        cfg = lm_config_from_moshi(lm_kwargs) if lm_kwargs is not None else LMConfig()
    tensors, name = _read(source)
    return model_from_flat(torch_to_sfm(tensors, cfg, source=name), cfg)


def export_moshi_lm(model: LM, path: str | Path, *, fused: bool = True) -> None:
    """Write the LM as a float32 Kyutai safetensors file (loadable by moshi's `get_moshi_lm`
    with `lm_kwargs=moshi_lm_kwargs(model.cfg)`)."""
    write_tensors(path, sfm_to_torch(model, model.cfg, fused=fused))
