"""Mesh construction, logical-axis rules, sharded NNX models and a two-process smoke test."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from sfm.nn.init import logical
from sfm.parallel.config import DEFAULT_RULES, MeshConfig
from sfm.parallel.distributed import initialize_from_env
from sfm.parallel.mesh import build_mesh
from sfm.parallel.rules import (
    activation_constraint,
    batch_sharding,
    logical_to_mesh_spec,
    param_shardings,
    shard_model,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBED, HIDDEN, BATCH = 16, 32, 8


class TinyMLP(nnx.Module):
    """Two dense layers with logical-axis annotations and one unannotated bias."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.w_in = nnx.Param(
            jax.random.normal(rngs.params(), (EMBED, HIDDEN)) / EMBED**0.5,
            **logical(("embed", "mlp")),
        )
        self.b_in = nnx.Param(jax.random.normal(rngs.params(), (HIDDEN,)))
        self.w_out = nnx.Param(
            jax.random.normal(rngs.params(), (HIDDEN, EMBED)) / HIDDEN**0.5,
            **logical(("mlp", "embed")),
        )

    def __call__(self, x_bd: jax.Array) -> jax.Array:
        h_bh = jax.nn.gelu(x_bd @ self.w_in[...] + self.b_in[...])
        return h_bh @ self.w_out[...]


class OddParam(nnx.Module):
    """A parameter whose "mlp" dim (6) no 4-way tensor axis divides."""

    def __init__(self) -> None:
        self.w = nnx.Param(jnp.ones((EMBED, 6)), **logical(("embed", "mlp")))


def _config(data: int, fsdp: int, tensor: int, **dcn: int) -> MeshConfig:
    return MeshConfig(ici_data=data, ici_fsdp=fsdp, ici_tensor=tensor, **dcn)


def _device_ids(mesh: jax.sharding.Mesh) -> np.ndarray:
    return np.vectorize(lambda d: d.id)(mesh.devices)


# --- mesh ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "shape"),
    [
        (MeshConfig(), (8, 1, 1)),
        (_config(2, -1, 2), (2, 2, 2)),
        (_config(1, 4, -1), (1, 4, 2)),
        (_config(1, 2, 4), (1, 2, 4)),
        (_config(-1, 1, 1, dcn_data=2), (8, 1, 1)),
        (_config(-1, 2, 1, dcn_tensor=2), (2, 2, 2)),
    ],
)
def test_mesh_shapes(cfg: MeshConfig, shape: tuple[int, ...]) -> None:
    mesh = build_mesh(cfg)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert sorted(_device_ids(mesh).ravel()) == list(range(8))


def test_mesh_on_device_subset() -> None:
    mesh = build_mesh(MeshConfig(ici_data=-1, ici_tensor=2), devices=jax.devices()[:4])
    assert tuple(mesh.shape.values()) == (2, 1, 2)


def test_mesh_dcn_is_major() -> None:
    ids = _device_ids(build_mesh(_config(-1, 1, 1, dcn_fsdp=2)))
    np.testing.assert_array_equal(ids[:, :, 0], [[0, 4], [1, 5], [2, 6], [3, 7]])


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (_config(-1, 3, 1), "mesh.ici_fsdp: 3 does not divide 8 devices"),
        (_config(1, 1, 1, dcn_data=3), "mesh.dcn_data: 3 does not divide 8 devices"),
        (_config(-1, -1, 1), "mesh.ici_data, mesh.ici_fsdp: at most one"),
        (_config(2, 2, 1), r"mesh.ici_\*: shape \(2, 2, 1\) uses 4 of the 8"),
        (_config(-1, 0, 1), "mesh.ici_fsdp: must be a positive size"),
    ],
)
def test_mesh_bad_shape(cfg: MeshConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_mesh(cfg)


# --- rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("logical", "expected"),
    [
        (("embed", "mlp"), P("fsdp", "tensor")),
        (P("batch", "time", "embed"), P(("data", "fsdp"), None, None)),
        (("embed", "batch"), P("fsdp", "data")),
        ((None, "kv", "heads"), P(None, None, "tensor")),
        ((("embed", "mlp"), None), P(("fsdp", "tensor"), None)),
        (("mlp", "vocab"), P("tensor", None)),
        ((), P()),
    ],
)
def test_logical_to_mesh_spec(logical: tuple, expected: P) -> None:
    assert logical_to_mesh_spec(logical, DEFAULT_RULES) == expected


def test_repeated_rule_is_a_fallback() -> None:
    rules = (("a", ("tensor",)), ("a", ("fsdp",)), ("b", ("tensor",)))
    assert logical_to_mesh_spec(("b", "a"), rules) == P("tensor", "fsdp")
    assert logical_to_mesh_spec(("a", "b"), rules) == P("tensor", None)


def test_unknown_logical_name() -> None:
    with pytest.raises(ValueError, match="'nope'"):
        logical_to_mesh_spec(("embed", "nope"), DEFAULT_RULES)


def test_rule_to_missing_mesh_axis() -> None:
    mesh = build_mesh(MeshConfig())
    with pytest.raises(ValueError, match="w_in: sharding rule maps to mesh axis 'expert'"):
        param_shardings(TinyMLP(nnx.Rngs(0)), mesh, (("embed", ("expert",)), ("mlp", None)))


# --- sharded models -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 2, 4)])
def test_sharded_model_matches_single_device(shape: tuple[int, int, int]) -> None:
    fsdp, tensor = shape[1], shape[2]
    mesh = build_mesh(_config(*shape))
    model = TinyMLP(nnx.Rngs(0))
    sharded = shard_model(model, mesh, DEFAULT_RULES)

    expected = {
        "w_in": (P("fsdp", "tensor"), (EMBED // fsdp, HIDDEN // tensor)),
        "w_out": (P("tensor", "fsdp"), (HIDDEN // tensor, EMBED // fsdp)),
        "b_in": (P(), (HIDDEN,)),
    }
    for name, (spec, shard_shape) in expected.items():
        value = getattr(sharded, name)[...]
        assert value.sharding.spec == spec, name
        assert value.sharding.shard_shape(value.shape) == shard_shape, name
    assert model.w_in[...].sharding.is_fully_replicated  # the input model is untouched

    x_bd = jax.random.normal(jax.random.key(1), (BATCH, EMBED))
    want = model(x_bd)
    got = _sharded_forward(sharded, mesh)(nnx.state(sharded), x_bd)
    assert got.sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def _sharded_forward(
    model: TinyMLP, mesh: jax.sharding.Mesh
) -> Callable[[nnx.State, jax.Array], jax.Array]:
    """jit(model(x)) with explicit parameter, input and output shardings."""
    graphdef = nnx.graphdef(model)
    x_sharding = batch_sharding(mesh, DEFAULT_RULES, ndim=2)

    def forward(state: nnx.State, x_bd: jax.Array) -> jax.Array:
        y_bd = nnx.merge(graphdef, state)(x_bd)
        return activation_constraint(y_bd, ("batch", "embed"), mesh, DEFAULT_RULES)

    shardings = param_shardings(model, mesh, DEFAULT_RULES)
    return jax.jit(forward, in_shardings=(shardings, x_sharding), out_shardings=x_sharding)


def test_indivisible_dim_falls_back_to_replicated() -> None:
    mesh = build_mesh(_config(1, 2, 4))
    fallbacks: list[str] = []
    shardings = param_shardings(OddParam(), mesh, DEFAULT_RULES, fallbacks=fallbacks)
    assert shardings["w"].get_value().spec == P("fsdp", None)
    assert fallbacks == ["w dim 1 (size 6) over ('tensor',) (4 ways)"]


def test_activation_constraint_without_mesh_is_identity() -> None:
    x = jnp.ones((2, 3))
    assert activation_constraint(x, ("batch", None), None, DEFAULT_RULES) is x


def test_batch_sharding() -> None:
    mesh = build_mesh(_config(2, 2, 2))
    assert batch_sharding(mesh, DEFAULT_RULES, ndim=3).spec == P(("data", "fsdp"), None, None)


# --- distributed initialization -----------------------------------------------------------


def test_single_process_initialize_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SFM_COORDINATOR", "SFM_NUM_PROCESSES", "SFM_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    info = initialize_from_env()
    assert (info.process_index, info.process_count, info.local_device_count) == (0, 1, 8)
    assert not jax.distributed.is_initialized()


def test_partial_distributed_env_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFM_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.delenv("SFM_NUM_PROCESSES", raising=False)
    monkeypatch.setenv("SFM_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="SFM_NUM_PROCESSES: must be set together"):
        initialize_from_env()


# --- several processes --------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sfm.parallel.config import MeshConfig
    from sfm.parallel.distributed import initialize_from_env
    from sfm.parallel.mesh import build_mesh

    jax.config.update("jax_num_cpu_devices", 2)
    info = initialize_from_env()
    again = initialize_from_env()
    mesh = build_mesh(MeshConfig(ici_data=4))
    local = np.arange(2, dtype=np.float32) + 2 * info.process_index + 1
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local, (4,))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    psum = jax.shard_map(
        lambda v: jax.lax.psum(v.sum(), "data"), mesh=mesh, in_specs=P("data"), out_specs=P()
    )(x)
    print(json.dumps({
        "info": [info.process_index, info.process_count, info.local_device_count],
        "same": info == again,
        "mesh": list(mesh.shape.values()),
        "sum": float(total.addressable_data(0)),
        "psum": float(psum.addressable_data(0)),
    }))
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_env(port: int, process_id: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        SFM_COORDINATOR=f"127.0.0.1:{port}",
        SFM_NUM_PROCESSES="2",
        SFM_PROCESS_ID=str(process_id),
    )
    return env


def test_two_processes_share_a_mesh() -> None:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER],
            env=_worker_env(port, i),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 120
    try:
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    for index, report in enumerate(reports):
        assert report["info"] == [index, 2, 2]
        assert report["same"]
        assert report["mesh"] == [4, 1, 1]
        assert report["sum"] == report["psum"] == 10.0
