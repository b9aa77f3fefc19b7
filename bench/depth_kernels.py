"""The fused depth-frame kernel against its XLA reference, Moshi 7B (K=8) and CSM (K=32)
depth shapes in bfloat16, batch 1 / 16 / 64.

On a TPU (the Mosaic kernel) or a CUDA GPU (the Mosaic GPU kernel): both timed in one run,
the ratio printed. Elsewhere (no accelerator here): both compiled ahead of time for v5e,
v5p and v6e with libtpu (Mosaic really compiles the kernel, inside the chip's VMEM) and
compared by the compiled programs' cost analysis: FLOPs, HBM bytes and the roofline time
they imply on that chip (max(FLOPs / peak bf16, bytes / HBM bandwidth)).

    python bench/depth_kernels.py                 # compile figures (CPU), timings (TPU/GPU)
    python bench/depth_kernels.py --batch 16 --chip v5e
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sfm.kernels.depth import DepthWeights, reference
from sfm.kernels.depth_gpu import depth_frame_gpu
from sfm.kernels.depth_plan import plan
from sfm.kernels.depth_tpu import depth_frame_kernel

CHIPS = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
CHIP_VERSION = {"v5e": "TPU_V5E", "v5p": "TPU_V5P", "v6e": "TPU_V6E"}
# (positions, layers, dim, temporal dim, heads, kv heads, hidden, card, weight sets)
SHAPES = {
    "moshi": (8, 6, 1024, 4096, 16, 16, 2816, 2048, 8),  # REFERENCE.md §2
    "csm": (32, 4, 1024, 2048, 8, 2, 8192, 2048, 1),  # §3: Llama-style 1B decoder
}


def depth_shapes(kind: str, dtype: Any = jnp.bfloat16) -> DepthWeights:
    """Abstract DepthWeights of the published depth transformers."""
    p, n, d, din, h, g, f, v, nw = SHAPES[kind]
    hd, s = d // h, jax.ShapeDtypeStruct
    moshi = kind == "moshi"
    return DepthWeights(
        w_in=s((nw, d, din), dtype),
        emb=tuple(s((v + 1, d if moshi else din), dtype) for _ in range(p - 1)),
        norm1=s((n, 1, d), dtype), wqkv=s((n, nw, (h + 2 * g) * hd, d), dtype),
        wo=s((n, nw, d, h * hd), dtype), norm2=s((n, 1, d), dtype),
        w1=s((n, nw, 2 * f, d), dtype), w2=s((n, nw, d, f), dtype),
        heads=s((p if moshi else p - 1, v, d), dtype),
        head0=None if moshi else s((1, v, din), dtype), kind=kind,  # type: ignore[arg-type]
        num_heads=h, kv_heads=g, norm_eps=1e-8, max_period=None if moshi else 10000.0,
    )  # type: ignore[arg-type]  # fmt: skip


def frame_args(w: DepthWeights, batch: int) -> tuple[Any, ...]:
    s, dt = jax.ShapeDtypeStruct, w.wqkv.dtype
    return (
        s((batch, w.w_in.shape[-1]), dt), s((batch, w.dim), dt), s((batch, 2), jnp.int32),
        s((batch, 1), jnp.float32), s((batch, 1), jnp.int32),
    )  # fmt: skip


def weight_bytes(w: DepthWeights) -> int:
    return sum(a.size * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(w))


@dataclasses.dataclass(frozen=True)
class CompileReport:
    chip: str
    kind: str
    batch: int
    impl: str
    vmem_bytes: int  # what the kernel's plan asks for (0: the XLA reference)
    vmem_capacity: int
    flops: float
    bytes_accessed: float
    weight_bytes: int
    roofline_s: float
    compile_s: float

    def __str__(self) -> str:
        return (
            f"{self.chip} {self.kind:5s} b={self.batch:<3d} {self.impl:6s} "
            f"vmem {self.vmem_bytes / 2**20:5.1f}/{self.vmem_capacity / 2**20:.0f} MiB  "
            f"{self.flops / 1e9:8.1f} GFLOP  {self.bytes_accessed / 2**20:8.1f} MiB  "
            f"roofline {self.roofline_s * 1e6:8.1f} us  (compile {self.compile_s:.1f} s)"
        )


def compile_depth_frame(
    chip: str, kind: str, batch: int, impl: str = "pallas", dtype: Any = jnp.bfloat16
) -> CompileReport:
    """Compile one frame of `kind`'s depth transformer for one `chip` core (libtpu)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from sfm.parallel.topology import parse_topology, topology_devices
    from sfm.train.aot import without_compilation_cache

    info = pltpu.get_tpu_info_for_chip(getattr(pltpu.ChipVersion, CHIP_VERSION[chip]), 1)
    capacity = int(info.vmem_capacity_bytes)
    w = depth_shapes(kind, dtype)

    def frame(w: DepthWeights, *args: jax.Array) -> jax.Array:
        if impl == "xla":
            return reference(w, *args, greedy=False)
        return depth_frame_kernel(
            w, *args, greedy=False, interpret=False, vmem_capacity_bytes=capacity
        )

    mesh = Mesh(topology_devices(parse_topology(CHIPS[chip]))[:1], ("x",))
    step = jax.shard_map(frame, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
    start = time.perf_counter()
    with without_compilation_cache():
        compiled = jax.jit(step).lower(w, *frame_args(w, batch)).compile()
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops, moved = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    vmem = plan(w, batch, dtype, capacity).vmem_bytes if impl == "pallas" else 0
    roofline = max(flops / info.bf16_ops_per_second, moved / info.mem_bw_bytes_per_second)
    return CompileReport(
        chip, kind, batch, impl, vmem, capacity, flops, moved, weight_bytes(w), roofline, seconds
    )


def compile_grouped_matmul(chip: str, impl: str, rows: int = 4096) -> CompileReport:
    """Forward + backward of Moshi 7B's depth MLP input projection as a grouped matmul
    (x [8, rows, 1024] x w [8, 5632, 1024], bfloat16) for one `chip` core."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from sfm.kernels.grouped_matmul import grouped_matmul
    from sfm.parallel.topology import parse_topology, topology_devices
    from sfm.train.aot import without_compilation_cache

    info = pltpu.get_tpu_info_for_chip(getattr(pltpu.ChipVersion, CHIP_VERSION[chip]), 1)
    k, d, f = 8, 1024, 5632
    s = jax.ShapeDtypeStruct
    x, w, ct = (
        s((k, rows, d), jnp.bfloat16),
        s((k, f, d), jnp.bfloat16),
        s((k, rows, f), jnp.bfloat16),
    )

    def step(x: jax.Array, w: jax.Array, ct: jax.Array) -> Any:
        def loss(x: jax.Array, w: jax.Array) -> jax.Array:
            y = grouped_matmul(x, w, impl=impl, interpret=False if impl == "pallas" else None)
            return jnp.sum((y * ct).astype(jnp.float32))

        return jax.grad(loss, (0, 1))(x, w)

    mesh = Mesh(topology_devices(parse_topology(CHIPS[chip]))[:1], ("x",))
    mapped = jax.shard_map(step, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
    start = time.perf_counter()
    with without_compilation_cache():
        compiled = jax.jit(mapped).lower(x, w, ct).compile()
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops, moved = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    roofline = max(flops / info.bf16_ops_per_second, moved / info.mem_bw_bytes_per_second)
    wbytes = k * f * d * 2
    return CompileReport(
        chip, "gmm", rows, impl, 0, int(info.vmem_capacity_bytes), flops, moved, wbytes,
        roofline, seconds,
    )  # fmt: skip


def time_on_device(kind: str, batch: int, iters: int) -> None:
    """Both sides on this TPU or GPU (its kernel), random weights, one run; prints ms per
    frame and the ratio."""
    w = depth_shapes(kind)
    keys = iter(jax.random.split(jax.random.key(0), 64))
    weights = jax.tree.map(
        lambda s: (jax.random.normal(next(keys), s.shape) * 0.02).astype(s.dtype), w
    )
    args = [
        (jax.random.normal(next(keys), a.shape) if a.dtype != jnp.int32
         else jnp.ones(a.shape, jnp.int32)).astype(a.dtype)
        for a in frame_args(w, batch)
    ]  # fmt: skip
    args[3] = jnp.full_like(args[3], 0.8)
    args[4] = jnp.full_like(args[4], 250)
    kernel = depth_frame_gpu if jax.default_backend() == "gpu" else depth_frame_kernel
    times = {}
    for impl in ("xla", "pallas"):
        fn = jax.jit(
            lambda w, *a, impl=impl: (
                reference(w, *a, greedy=False) if impl == "xla" else kernel(w, *a, greedy=False)
            )
        )
        fn(weights, *args).block_until_ready()
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(weights, *args)
        out.block_until_ready()
        times[impl] = (time.perf_counter() - start) / iters
    print(
        f"{jax.devices()[0].device_kind} {kind} b={batch}: xla {times['xla'] * 1e3:.3f} ms  "
        f"pallas {times['pallas'] * 1e3:.3f} ms  ratio xla/pallas "
        f"{times['xla'] / times['pallas']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=list(SHAPES), action="append")
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--chip", choices=list(CHIPS), action="append")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    kinds, batches = args.kind or list(SHAPES), args.batch or [1, 16, 64]
    backend = jax.default_backend()
    if backend in ("tpu", "gpu"):
        for kind in kinds:
            for batch in batches:
                time_on_device(kind, batch, args.iters)
        return
    print("no TPU: ahead-of-time compiles for TPU chips (libtpu), cost analysis per frame")
    for chip in args.chip or list(CHIPS):
        for kind in kinds:
            for batch in batches:
                ker = compile_depth_frame(chip, kind, batch)
                ref = compile_depth_frame(chip, kind, batch, "xla")
                print(ker)
                print(ref)
                print(f"    roofline ratio xla/pallas {ref.roofline_s / ker.roofline_s:.2f}")
            sys.stdout.flush()
        ker, ref = (compile_grouped_matmul(chip, impl) for impl in ("pallas", "xla"))
        print(ker)
        print(ref)
        print(f"    roofline ratio xla/pallas {ref.roofline_s / ker.roofline_s:.2f}")


if __name__ == "__main__":
    main()
