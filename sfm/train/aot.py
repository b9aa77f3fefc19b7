"""Ahead-of-time compile of the train step for a Cloud TPU topology, on any machine.

`compile_for_topology(cfg, "v5p-128")` builds the model abstractly, shards it over a mesh of
the topology's (virtual) devices, lowers and compiles the jitted train step with libtpu
(`pip install sfm[tpu]`) and reports per-device memory and FLOPs, so a config can be checked
to fit before any TPU is rented. Out-of-HBM fails here, as it would on the real slice.
The compiled step is the one `sfm train` runs: parameters and optimizer state sharded by
`mesh.rules`, activations batch-sharded by the model's `constrain` calls (the step enters
`activation_sharding` around the loss). Measured numbers for moshi_7b: launch/README.md.

FLOPs: "model" is the analytic training count used for MFU (sfm.train.metrics); XLA's cost
analysis of the compiled step counts a loop body once, so with the layers under `scan` it
sees one layer per stack and is a lower bound.

Topology names (`v5p-128`, `v6e:8x16`, ...) and their table: sfm.parallel.topology.

Run as `sfm compile CONFIG --topology NAME [KEY=VALUE ...]` (or `python -m sfm.train.aot`
with the same arguments); CONFIG is a YAML path or a preset name under configs/train/.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m sfm.train.aot`: host settings before jax is imported
    import sfm.host

    sfm.host.configure(compile_only=True)

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from sfm.config import Config, ConfigError, load_config, resolve_preset  # noqa: E402
from sfm.errors import SfmError, first_line  # noqa: E402
from sfm.parallel.mesh import build_mesh  # noqa: E402
from sfm.parallel.rules import batch_sharding, check_global_batch  # noqa: E402
from sfm.parallel.topology import (  # noqa: E402
    GiB,
    Topology,
    TopologyError,
    parse_topology,
    topology_devices,
)
from sfm.train.step import (  # noqa: E402
    TrainParts,
    build_train_step,
    make_optimizer,
    train_shardings,
)
from sfm.train.tasks import Task, get_task  # noqa: E402


class AotError(SfmError, RuntimeError):
    """The program does not fit (or does not compile) on the topology; one line says why."""


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Per-device memory and FLOPs of one compiled train step on a topology."""

    config: str
    topology: str
    libtpu_topology: str
    devices: int
    hosts: int
    mesh: dict[str, int]
    global_batch: int
    seq_len: int  # frames of an LM sequence, samples of a codec crop
    params: int  # parameters of the model (trained and frozen)
    trainable: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    peak_bytes: int
    hbm_bytes: int
    xla_flops: float  # per device and step, XLA's cost analysis of the compiled program
    model_flops: float  # analytic training FLOPs of the whole step, all devices
    compile_seconds: float
    unit: str = "frames"  # of seq_len
    kernels: tuple[str, ...] = ()  # the Mosaic kernels in the program (lm.attention_impl)

    @property
    def headroom_bytes(self) -> int:
        return self.hbm_bytes - self.peak_bytes

    @property
    def headroom_fraction(self) -> float:
        return self.headroom_bytes / self.hbm_bytes

    def table(self) -> str:
        """The report as a short two-column table."""
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        per_device = self.model_flops / self.devices
        hosts = f"{self.hosts} host{'s' * (self.hosts != 1)}"
        rows = [
            ("config", self.config),
            ("topology", f"{self.topology} ({self.libtpu_topology}, {hosts})"),
            ("mesh", f"{mesh} ({self.devices} devices)"),
            ("batch", f"{self.global_batch} x {self.seq_len} {self.unit}"),
            ("parameters", f"{_count(self.params)} ({_count(self.trainable)} trained)"),
            ("arguments / device", _bytes(self.argument_bytes)),
            ("outputs / device", _bytes(self.output_bytes)),
            ("donated / device", _bytes(self.alias_bytes)),
            ("temporaries / device", _bytes(self.temp_bytes)),
            ("peak / device", _bytes(self.peak_bytes)),
            ("HBM / device", _bytes(self.hbm_bytes)),
            ("headroom / device", f"{_bytes(self.headroom_bytes)} ({self.headroom_fraction:.0%})"),
            ("model FLOPs / step", f"{self.model_flops:.3e} ({per_device:.3e} / device)"),
            ("XLA FLOPs / device", f"{self.xla_flops:.3e} (scanned layers counted once)"),
            ("compile time", f"{self.compile_seconds:.1f} s"),
        ]
        if self.kernels:
            rows.append(("Mosaic kernels", ", ".join(self.kernels)))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.3f} M"


def _abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (same structure)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _size(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_parts(cfg: Config, task: Task, mesh: Mesh) -> TrainParts:
    """TrainParts of ShapeDtypeStructs with shardings: nothing is allocated."""
    no_init = dataclasses.replace(cfg.train, init_from=None, init_text_from=None)
    cfg = dataclasses.replace(cfg, train=no_init)
    model = nnx.eval_shape(lambda: task.build_model(cfg))
    mutable_filter = task.mutable(cfg)
    graphdef, params, mutable, frozen = nnx.split(model, task.trainable(cfg), mutable_filter, ...)
    tx = make_optimizer(cfg.train.optim, cfg.train.steps)
    sh = train_shardings(params, mutable, frozen, tx, mesh, cfg.mesh.rules)
    params, mutable, frozen = (
        _abstract(x, sh[k])
        for x, k in ((params, "params"), (mutable, "mutable"), (frozen, "frozen"))
    )
    opt_state = _abstract(jax.eval_shape(tx.init, params), sh["opt_state"])
    return TrainParts(
        graphdef, params, mutable, frozen, opt_state, tx, sh, mutable_filter, cfg.mesh.rules
    )


def abstract_batch(cfg: Config, task: Task, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The task's global batch (`data.batch_size` rows), sharded on the batch axis as
    `shard_batch` places it in training (ConfigError when it does not divide)."""
    check_global_batch(cfg.data.batch_size, mesh, cfg.mesh.rules)
    return {
        name: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=batch_sharding(mesh, cfg.mesh.rules, len(x.shape))
        )
        for name, x in task.batch_shapes(cfg).items()
    }


@contextlib.contextmanager
def without_compilation_cache() -> Iterator[None]:
    """Compile for a TPU topology inside this: a persistent compilation cache (one a library
    user turned on) would store the TPU program but cannot load it back without a TPU
    client, so it is kept out of the way and restored after."""
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # jax decides once whether to use it: decide again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
        compilation_cache.reset_cache()


def _compile(step: Any, args: tuple[Any, ...], label: str) -> tuple[Any, float, tuple[str, ...]]:
    """Lower and compile: (compiled, seconds, its Mosaic kernels); out-of-memory becomes an
    AotError."""
    t0 = time.perf_counter()
    try:
        with without_compilation_cache():
            lowered = step.lower(*args)
            kernels = mosaic_kernels(lowered.as_text())
            compiled = lowered.compile()
    except Exception as err:  # XLA raises JaxRuntimeError / XlaRuntimeError
        if "RESOURCE_EXHAUSTED" in str(err):
            raise AotError(f"{label}: out of HBM at compile time: {_oom_summary(err)}") from err
        raise
    return compiled, time.perf_counter() - t0, kernels


def _oom_summary(err: BaseException) -> str:
    """XLA's out-of-memory message (the sizes it needs and has) on one line."""
    text = first_line(err).removeprefix("RESOURCE_EXHAUSTED:").strip()
    return text if len(text) <= 300 else text[:297] + "..."


def compile_for_topology(cfg: Config, topology: str, label: str = "config") -> CompileReport:
    """Compile `cfg`'s train step for a TPU topology and report its per-device memory.

    Raises AotError when the program needs more HBM than a chip has."""
    topo = parse_topology(topology)
    where = f"{label} on {topo.name}"
    devices = topology_devices(topo)
    hosts = len({d.process_index for d in devices})
    try:
        mesh = build_mesh(cfg.mesh, devices)
        task = get_task(cfg)
        batch_args = abstract_batch(cfg, task, mesh)
    except ConfigError as err:  # a setting that does not suit the topology: exit status 2
        raise ConfigError(f"{where}: {err}") from None
    batch = cfg.data.batch_size
    length = next(iter(batch_args.values())).shape[-1]
    shape = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
    where = f"{where} (mesh {shape}, batch {batch} x {length})"
    parts = abstract_parts(cfg, task, mesh)
    step = build_train_step(parts, task.loss_fn(cfg), cfg.train)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parts.shardings["replicated"])
    args = (parts.params, parts.mutable, parts.frozen, parts.opt_state)
    compiled, seconds, kernels = _compile(step, (*args, batch_args, rng), where)
    report = _report(cfg, label, topo, mesh, hosts, batch, length, parts, compiled, seconds)
    report = dataclasses.replace(report, kernels=kernels)
    if report.peak_bytes > report.hbm_bytes:
        raise AotError(
            f"{where}: peak {report.peak_bytes / GiB:.2f} GiB per device exceeds the "
            f"{report.hbm_bytes / GiB:.0f} GiB of HBM"
        )
    return report


def _report(
    cfg: Config,
    label: str,
    topo: Topology,
    mesh: Mesh,
    hosts: int,
    batch: int,
    length: int,
    parts: TrainParts,
    compiled: Any,
    seconds: float,
) -> CompileReport:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    peak = getattr(mem, "peak_memory_in_bytes", 0) or (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    trainable = _size(parts.params)
    return CompileReport(
        config=label,
        topology=topo.name,
        libtpu_topology=topo.libtpu_name,
        devices=mesh.size,
        hosts=hosts,
        mesh=dict(mesh.shape),
        global_batch=batch,
        seq_len=length,
        unit="samples" if cfg.train.task == "codec" else "frames",
        params=trainable + _size(parts.frozen) + _size(parts.mutable),
        trainable=trainable,
        argument_bytes=mem.argument_size_in_bytes,
        output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes,
        code_bytes=mem.generated_code_size_in_bytes,
        peak_bytes=peak,
        hbm_bytes=topo.generation.hbm_bytes,
        xla_flops=float(cost.get("flops", 0.0)) if cost else 0.0,
        model_flops=get_task(cfg).cost(cfg)[1],
        compile_seconds=seconds,
    )


def mosaic_kernels(stablehlo: str) -> tuple[str, ...]:
    """The Mosaic (Pallas TPU) kernels a lowered program calls: "name x count", by name."""
    counts: dict[str, int] = {}
    for line in stablehlo.splitlines():
        if "@tpu_custom_call" in line:
            found = re.search(r'kernel_name = "([^"]+)"', line)
            name = found.group(1) if found else "unnamed"
            counts[name] = counts.get(name, 0) + 1
    return tuple(f"{name} x{n}" for name, n in sorted(counts.items()))


def run(config: str, topology: str, overrides: Sequence[str], *, prefix: str = "error") -> int:
    """Compile CONFIG (with overrides) for the topology and print the report; returns the
    exit status: 0, 1 when it does not fit or compile, 2 for a bad config. Errors are one
    line on stderr, `{prefix}: ...` (`sfm compile` calls this too)."""
    try:
        cfg = load_config(resolve_preset(config, "train"), list(overrides))
        report = compile_for_topology(cfg, topology, label=config)
    except (ConfigError, AotError, TopologyError) as err:
        print(f"{prefix}: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    print(report.table())
    return 0


if __name__ == "__main__":  # `python -m sfm.train.aot ...` is `sfm compile ...`
    from sfm.cli import main

    sys.exit(main(["compile", *sys.argv[1:]]))
