"""Import/export Mimi weights in Kyutai's safetensors layout.

PyTorch stores conv kernels [out, in, k], transposed-conv kernels [in, out/groups, k] and
linears [out, in]; sfm stores [k, in, out], [k, out, in/groups] and [out, in]. The key map
is derived from the config, so a reduced Mimi converts the same way as the full one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from sfm.codec.config import CodecConfig
from sfm.codec.model import Mimi
from sfm.io.tensors import InteropError, read_tensors, widen, write_tensors

Array = np.ndarray
Entry = tuple[str, str, str]  # (kyutai key, sfm state path, layout kind)

# kind -> (torch -> sfm, sfm -> torch). Transposed convs: torch [in, out/g, k] -> sfm
# [k, out, in/g]; for the depthwise upsample (in = out = groups) that is [k, channels, 1].
_LAYOUTS: dict[str, tuple[Callable[[Array], Array], Callable[[Array], Array]]] = {
    "copy": (lambda w: w, lambda w: w),
    "conv": (lambda w: w.transpose(2, 1, 0), lambda w: w.transpose(2, 1, 0)),
    "convtr": (lambda w: w.transpose(2, 1, 0), lambda w: w.transpose(2, 1, 0)),
    "convtr_depthwise": (lambda w: w.transpose(2, 0, 1), lambda w: w.transpose(1, 2, 0)),
    "linear": (lambda w: w, lambda w: w),
    "proj1x1": (lambda w: w[:, :, 0], lambda w: w[:, :, None]),
}
# Older checkpoints name the fused attention projections differently; all are accepted.
_ALIASES = {
    "self_attn.in_proj_weight": ("self_attn.in_projs.0.weight", "self_attn.in_proj.weight"),
    "self_attn.out_proj.weight": ("self_attn.out_projs.0.weight",),
}


def _conv(tkey: str, path: str, bias: bool = True) -> Iterator[Entry]:
    yield f"{tkey}.weight", f"{path}/kernel", "conv"
    if bias:
        yield f"{tkey}.bias", f"{path}/bias", "copy"


def _seanet(prefix: str, cfg: CodecConfig, decoder: bool) -> Iterator[Entry]:
    s = cfg.seanet
    i = 0
    yield from _conv(f"{prefix}.model.{i}.conv.conv", f"{prefix}/stages/{i}")
    for _ in s.ratios:
        blocks = [*range(i + 1, i + 1 + s.n_residual_layers)]
        if decoder:  # ELU, transposed conv, then residual blocks
            i += 2
            yield (
                f"{prefix}.model.{i}.convtr.convtr.weight",
                f"{prefix}/stages/{i}/kernel",
                "convtr",
            )
            yield f"{prefix}.model.{i}.convtr.convtr.bias", f"{prefix}/stages/{i}/bias", "copy"
            blocks = [*range(i + 1, i + 1 + s.n_residual_layers)]
            i += s.n_residual_layers
        else:  # residual blocks, ELU, strided conv
            i += s.n_residual_layers + 2
            yield from _conv(f"{prefix}.model.{i}.conv.conv", f"{prefix}/stages/{i}")
        for b in blocks:
            yield from _conv(f"{prefix}.model.{b}.block.1.conv.conv", f"{prefix}/stages/{b}/conv1")
            yield from _conv(f"{prefix}.model.{b}.block.3.conv.conv", f"{prefix}/stages/{b}/conv2")
    i += 2
    yield from _conv(f"{prefix}.model.{i}.conv.conv", f"{prefix}/stages/{i}")


def _transformer(prefix: str, cfg: CodecConfig) -> Iterator[Entry]:
    for n in range(cfg.transformer.num_layers):
        t, p = f"{prefix}.transformer.layers.{n}", f"{prefix}/layers/{n}"
        yield f"{t}.self_attn.in_proj_weight", f"{p}/self_attn/in_proj/kernel", "linear"
        yield f"{t}.self_attn.out_proj.weight", f"{p}/self_attn/out_proj/kernel", "linear"
        for norm in ("norm1", "norm2"):
            yield f"{t}.{norm}.weight", f"{p}/{norm}/scale", "copy"
            yield f"{t}.{norm}.bias", f"{p}/{norm}/bias", "copy"
        yield f"{t}.linear1.weight", f"{p}/mlp/linear1/kernel", "linear"
        yield f"{t}.linear2.weight", f"{p}/mlp/linear2/kernel", "linear"
        if cfg.transformer.layer_scale is not None:
            yield f"{t}.layer_scale_1.scale", f"{p}/layer_scale_1/scale", "copy"
            yield f"{t}.layer_scale_2.scale", f"{p}/layer_scale_2/scale", "copy"


def _quantizer(cfg: CodecConfig) -> Iterator[Entry]:
    q = cfg.quantizer
    for name, n in (
        ("rvq_first", q.n_q_semantic),
        ("rvq_rest", q.total_codebooks - q.n_q_semantic),
    ):
        t, p = f"quantizer.{name}", f"quantizer/{name}"
        yield f"{t}.input_proj.weight", f"{p}/input_proj/kernel", "proj1x1"
        yield f"{t}.output_proj.weight", f"{p}/output_proj/kernel", "proj1x1"
        for j in range(n):
            cb = f"{t}.vq.layers.{j}._codebook"
            yield f"{cb}.embedding_sum", f"{p}/layers/{j}/embedding_sum", "copy"
            yield f"{cb}.cluster_usage", f"{p}/layers/{j}/cluster_usage", "copy"
            yield f"{cb}._initialized", f"{p}/layers/{j}/initialized", "copy"


def key_map(cfg: CodecConfig) -> list[Entry]:
    """Every (Kyutai key, sfm state path, layout) pair of a Mimi with this config."""
    return [
        *_seanet("encoder", cfg, decoder=False),
        *_transformer("encoder_transformer", cfg),
        ("downsample.conv.conv.conv.weight", "downsample/kernel", "conv"),
        *_quantizer(cfg),
        ("upsample.convtr.convtr.convtr.weight", "upsample/kernel", "convtr_depthwise"),
        *_transformer("decoder_transformer", cfg),
        *_seanet("decoder", cfg, decoder=True),
    ]


def _fold_weight_norm(tensors: dict[str, Array]) -> dict[str, Array]:
    """Replace weight-norm pairs (g, v) by the plain weight g * v / ||v|| (norm over dims 1..)."""
    out = dict(tensors)
    for g_key in [
        k for k in tensors if k.endswith(("weight_g", "parametrizations.weight.original0"))
    ]:
        base = (
            g_key.rsplit(".weight_g", 1)[0]
            if g_key.endswith("weight_g")
            else g_key.split(".parametrizations.")[0]
        )
        v_key = (
            f"{base}.weight_v"
            if g_key.endswith("weight_g")
            else f"{base}.parametrizations.weight.original1"
        )
        g, v = out.pop(g_key), out.pop(v_key)
        norm = np.sqrt(np.sum(np.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))
        out[f"{base}.weight"] = (g * v / norm).astype(v.dtype)
    return out


def _lookup(tensors: Mapping[str, Array], key: str) -> tuple[str, Array] | None:
    for suffix, alts in _ALIASES.items():
        if key.endswith(suffix):
            for alt in (key, *(key[: -len(suffix)] + a for a in alts)):
                if alt in tensors:
                    return alt, tensors[alt]
            return None
    return (key, tensors[key]) if key in tensors else None


def torch_to_sfm(
    tensors: Mapping[str, Array], cfg: CodecConfig, *, source: str = "checkpoint"
) -> dict[str, Array]:
    """Kyutai state dict -> {sfm path: array}; fails on missing, unexpected or misshapen keys."""
    tensors = _fold_weight_norm(dict(tensors))
    used: set[str] = set()
    out: dict[str, Array] = {}
    for tkey, path, kind in key_map(cfg):
        found = _lookup(tensors, tkey)
        if found is None:
            raise InteropError(
                f"{source}: missing key {tkey} (does the codec config match the checkpoint?)"
            )
        used.add(found[0])
        out[path] = _LAYOUTS[kind][0](np.asarray(found[1]))
    extra = sorted(set(tensors) - used)
    if extra:
        raise InteropError(
            f"{source}: {len(extra)} unexpected keys, first {extra[0]} "
            "(is the codec config smaller than the checkpoint?)"
        )
    return out


def sfm_to_torch(flat: Mapping[str, Array], cfg: CodecConfig) -> dict[str, Array]:
    """{sfm path: array} -> Kyutai state dict (fused attention keys named `in_proj_weight`)."""
    return {
        tkey: np.ascontiguousarray(_LAYOUTS[kind][1](np.asarray(flat[path])))
        for tkey, path, kind in key_map(cfg)
    }


def model_to_flat(model: Mimi) -> dict[str, Array]:
    """The codec's variables as {"a/b/c": numpy array}."""
    flat = nnx.to_flat_state(nnx.state(model))
    return {"/".join(str(p) for p in path): np.asarray(v[...]) for path, v in flat}


def load_flat_into(model: Mimi, flat: Mapping[str, Array], *, source: str = "checkpoint") -> None:
    """Write arrays into the model's variables, checking that every shape matches."""
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        key = "/".join(str(p) for p in path)
        value = flat[key]
        if tuple(value.shape) != tuple(var.shape):
            raise InteropError(
                f"{source}: {key} has shape {tuple(value.shape)}, "
                f"the config expects {tuple(var.shape)}"
            )
        var[...] = value.astype(var[...].dtype)
    nnx.update(model, state)


def load_kyutai_into(model: Mimi, path: str | Path) -> None:
    """Load a Kyutai Mimi safetensors file into an existing sfm Mimi of the same config."""
    tensors = {k: widen(v) for k, v in read_tensors(path).items()}
    load_flat_into(model, torch_to_sfm(tensors, model.cfg, source=str(path)), source=str(path))


def import_mimi(path: str | Path, cfg: CodecConfig, *, seed: int = 0) -> Mimi:
    """Build an sfm Mimi from a Kyutai Mimi safetensors file."""
    model = Mimi(cfg, rngs=nnx.Rngs(seed))
    load_kyutai_into(model, path)
    return model


def export_mimi(model: Mimi, path: str | Path) -> None:
    """Write the codec in Kyutai's safetensors layout (loadable by moshi's `get_mimi`)."""
    write_tensors(path, sfm_to_torch(model_to_flat(model), model.cfg))


def moshi_config(cfg: CodecConfig) -> dict[str, Any]:
    """moshi's `mimi_config` for `cfg`: what `loaders.get_mimi` takes, and what a Kyutai
    repo's `mimi_config_name` file holds for a Mimi that is not the released one."""
    s, t, q = cfg.seanet, cfg.transformer, cfg.quantizer
    seanet = {
        "channels": s.channels,
        "dimension": s.dimension,
        "causal": True,
        "n_filters": s.n_filters,
        "n_residual_layers": s.n_residual_layers,
        "activation": "ELU",
        "compress": s.compress,
        "dilation_base": s.dilation_base,
        "disable_norm_outer_blocks": 0,
        "kernel_size": s.kernel_size,
        "residual_kernel_size": s.residual_kernel_size,
        "last_kernel_size": s.last_kernel_size,
        "norm": "none",
        "pad_mode": s.pad_mode,
        "ratios": list(s.ratios),
        "true_skip": s.true_skip,
    }
    quantizer = {
        "dimension": q.dimension,
        "n_q": q.total_codebooks,
        "n_q_semantic": q.n_q_semantic,
        "bins": q.bins,
        "decay": q.decay,
        "threshold_usage_ratio": q.threshold_usage_ratio,
        "replaced_usage_ratio": q.replaced_usage_ratio,
        "q_dropout": q.q_dropout,
        "input_dimension": s.dimension,
        "output_dimension": s.dimension,
    }
    transformer = {
        "d_model": t.d_model,
        "num_heads": t.num_heads,
        "num_layers": t.num_layers,
        "causal": True,
        "layer_scale": t.layer_scale,
        "context": t.context,
        "conv_layout": True,
        "max_period": t.max_period,
        "gating": "none",
        "norm": "layer_norm",
        "positional_embedding": "rope",
        "dim_feedforward": t.dim_feedforward,
        "input_dimension": s.dimension,
        "output_dimensions": [s.dimension],
    }
    return {
        "sample_rate": cfg.sample_rate,
        "channels": s.channels,
        "frame_rate": cfg.frame_rate,
        "seanet": seanet,
        "quantizer": quantizer,
        "transformer": transformer,
    }
