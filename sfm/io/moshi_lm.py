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

from sfm.io.moshi_lm_config import lm_config_from_moshi
from sfm.io.tensors import InteropError, read_tensors, widen, write_tensors
from sfm.lm.config import LMConfig
from sfm.lm.model import LM

Array = np.ndarray
Entry = tuple[str, str, tuple[int, ...], bool]  # (kyutai key, sfm path, slot, is_norm)

_FUSED = {  # fused Kyutai name -> per-step name (`{s}` is the step)
    "self_attn.in_proj_weight": "self_attn.in_projs.{s}.weight",
    "self_attn.in_proj.weight": "self_attn.in_projs.{s}.weight",
    "self_attn.out_proj.weight": "self_attn.out_projs.{s}.weight",
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
