"""Block sizes, VMEM accounting and the cost estimate of the fused depth-frame kernel
(`sfm.kernels.depth_tpu`).

The kernel keeps in VMEM: the blocks of the weights of the current (position, layer, MLP
chunk), double-buffered so the next ones stream in behind the compute; the blocks that
change once per position (input projection, head), double-buffered too unless the chip is
short of VMEM; one embedding table (copied in at each position); and the scratch of the
frame (residual stream, MLP input and sum, every layer's keys and values). `plan` picks
the batch tile and the MLP chunk that fit a chip's VMEM, largest first.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sfm.kernels.depth import DepthWeights

MIB = 1 << 20
_LANES = 128
_MAX_ROWS = 256


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def sublanes(dtype: Any) -> int:
    """Rows of one VMEM tile for `dtype` (8 for 32-bit, 16 for 16-bit values)."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _nbytes(a: Any, shape: tuple[int, ...] | None = None) -> int:
    return 0 if a is None else math.prod(shape or a.shape) * jnp.dtype(a.dtype).itemsize


def hidden_chunks(w: DepthWeights) -> list[int]:
    """MLP chunk widths to try, largest first: multiples of 128 dividing F whose chunk of a
    weight stays within 2 MiB (F itself when F is no multiple of 128)."""
    f = w.hidden
    if f % _LANES:
        return [f]
    row = w.dim * jnp.dtype(w.w1.dtype).itemsize
    sizes = [c for c in range(f, 0, -_LANES) if f % c == 0]
    return [c for c in sizes if c * row <= 2 * MIB] or [sizes[-1]]


def vmem_bytes(w: DepthWeights, bt: int, bf: int, dtype: Any, single: bool = False) -> int:
    """VMEM the kernel asks for at batch tile `bt` and MLP chunk `bf` (see the module
    docstring); [rows, 1] blocks count as lane-padded [rows, 128]. An upper bound: for the
    published shapes Mosaic's own count (v5p, bfloat16, double buffers) was 5-14 MiB lower
    (Moshi 7B at 128 and 256 rows: 77.9 and 108.6 MiB against 84.1 and 113.0; CSM at 64
    rows: 91.1 against 105.6)."""
    item, d, p = jnp.dtype(dtype).itemsize, w.dim, w.positions
    dq, din = w.num_heads * w.head_dim, w.w_in.shape[-1]
    column = bt * _LANES * 4  # a [bt, 1] block in VMEM
    per_position = _nbytes(w.w_in, w.w_in.shape[1:]) + _nbytes(w.heads, w.heads.shape[1:])
    per_position += _nbytes(w.head0, None if w.head0 is None else w.head0.shape[1:])
    per_position += dq * (w.num_heads + dq) * 4  # the head-sum and widening matrices
    per_step = 2 * _nbytes(w.norm1, w.norm1.shape[1:]) + 2 * dq * 4  # norms, RoPE rows
    per_step += _nbytes(w.wqkv, w.wqkv.shape[2:]) + _nbytes(w.wo, w.wo.shape[2:])
    per_step += 3 * _nbytes(w.w1, (bf, d)) + bt * (din + d) * item + bt * 2 * 4 + 3 * column
    table = _nbytes(w.emb[0]) if w.emb else 0
    scratch = bt * d * (2 * item + 4) + 2 * w.layers * p * bt * dq * item + column + table
    output = 2 * p * column
    buffers = (1 if single else 2) * per_position + 2 * per_step
    return buffers + scratch + output


@dataclasses.dataclass(frozen=True)
class Plan:
    rows: int  # batch tile
    chunk: int  # MLP hidden units per grid step
    single: bool  # one buffer for the per-position blocks
    vmem_bytes: int


def plan(
    w: DepthWeights,
    batch: int,
    dtype: Any,
    capacity: int,
    block_b: int | None = None,
    block_f: int | None = None,
) -> Plan:
    """The largest batch tile (tiles of equal rows, at most 256), then the widest MLP chunk,
    double buffers before single ones, that fit `capacity` bytes of VMEM; `block_b` /
    `block_f` fix either."""
    sub = sublanes(dtype)
    if block_b is not None and block_b % sub:
        raise ValueError(f"block_b: {block_b} must be a multiple of {sub} for {jnp.dtype(dtype)}")
    if block_f is not None and (w.hidden % block_f or (block_f % _LANES and block_f != w.hidden)):
        raise ValueError(f"block_f: {block_f} must divide {w.hidden} and be a multiple of 128")
    tiles = -(-batch // _MAX_ROWS)
    rows = [block_b] if block_b else []
    while not block_b:
        bt = round_up(-(-batch // tiles), sub)
        rows.append(bt)
        if bt == sub:
            break
        tiles *= 2
    for bt in rows:
        for bf in [block_f] if block_f else hidden_chunks(w):
            for single in (False, True):
                need = vmem_bytes(w, bt, bf, dtype, single)
                if need + 4 * MIB <= capacity:
                    return Plan(bt, bf, single, need)
    need = vmem_bytes(w, rows[-1], block_f or hidden_chunks(w)[-1], dtype, True)
    raise ValueError(
        f"depth kernel: a batch tile of {rows[-1]} rows needs {need / MIB:.1f} MiB of VMEM, "
        f"more than the {capacity / MIB:.0f} MiB there are"
    )


def vmem_capacity() -> int:
    """This TPU's VMEM (64 MiB, the smallest of current chips, off a TPU: an ahead-of-time
    compile for a larger chip passes its own)."""
    if jax.default_backend() == "tpu":
        return int(pltpu.get_tpu_info().vmem_capacity_bytes)
    return 64 * MIB


def cost(w: DepthWeights, batch: int, tiles: int) -> pl.CostEstimate:
    """FLOPs, transcendentals and HBM bytes of one frame (every tile streams the weights)."""
    p, n, d, v = w.positions, w.layers, w.dim, w.vocab
    dq, din, f = w.num_heads * w.head_dim, w.w_in.shape[-1], w.hidden
    per_layer = w.wqkv.shape[2] * d + d * dq + 3 * f * d  # weights read per (position, layer)
    table = math.prod(w.emb[0].shape) if w.emb else 0
    macs = p * (d * din + table + n * per_layer + v * d) + n * p * p * dq * 2
    trans = p * (n * (p * w.num_heads + f) + 2 * v)
    layer_bytes = sum(_nbytes(a, a.shape[2:]) for a in (w.wqkv, w.wo, w.w1, w.w2))
    weights = p * (
        n * layer_bytes + _nbytes(w.w_in, w.w_in.shape[1:]) + _nbytes(w.heads, w.heads.shape[1:])
    ) + sum(_nbytes(t) for t in w.emb) + _nbytes(w.head0)  # fmt: skip
    return pl.CostEstimate(
        flops=2 * batch * macs, transcendentals=batch * trans, bytes_accessed=tiles * weights
    )


__all__ = ["MIB", "Plan", "cost", "hidden_chunks", "plan", "round_up", "sublanes",
           "vmem_bytes", "vmem_capacity"]  # fmt: skip
