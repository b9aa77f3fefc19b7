"""Ahead-of-time compile of the train step for Cloud TPU topologies (libtpu, no TPU needed)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from sfm import cli
from sfm.config import ConfigError, load_config
from sfm.lm.model import LM
from sfm.parallel.mesh import build_mesh
from sfm.parallel.topology import TopologyError, parse_topology, topology_devices
from sfm.train import aot
from sfm.train.step import build_train_step
from sfm.train.tasks import LMTask

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny_pretrain.yaml"
DUPLEX = ROOT / "configs" / "train" / "tiny_duplex.yaml"
MOSHI_7B = ROOT / "configs" / "lm" / "moshi_7b.yaml"
MESH_2X2X2 = ["mesh.ici_data=2", "mesh.ici_fsdp=2", "mesh.ici_tensor=2"]

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install sfm[tpu])",
)


@pytest.mark.parametrize(
    ("name", "libtpu_name", "chips", "per_host", "wrap"),
    [
        ("v4-8", "v4:2x2x1", 4, (2, 2, 1), False),
        ("v4-32", "v4:2x2x4", 16, (2, 2, 1), False),
        ("v5p-8", "v5:2x2x1", 4, (2, 2, 1), False),
        ("v5p-64", "v5:2x4x4", 32, (2, 2, 1), False),
        ("v5p-128", "v5:4x4x4", 64, (2, 2, 1), True),
        ("v5p-256", "v5:4x4x8", 128, (2, 2, 1), True),
        ("v5e-1", "v5e:1x1", 1, (1, 1, 1), False),
        ("v5e-8", "v5e:2x4", 8, (2, 4, 1), False),
        ("v5e-16", "v5e:4x4", 16, (2, 2, 1), False),
        ("v5e-32", "v5e:4x8", 32, (2, 2, 1), False),
        ("v6e-64", "v6e:8x8", 64, (2, 2, 1), False),
        ("v6e-256", "v6e:16x16", 256, (2, 2, 1), False),
        ("v5p:4x4x8", "v5:4x4x8", 128, (2, 2, 1), True),
    ],
)
def test_cloud_names_map_to_libtpu_topologies(
    name: str, libtpu_name: str, chips: int, per_host: tuple[int, ...], wrap: bool
) -> None:
    topo = parse_topology(name)
    assert (topo.libtpu_name, topo.chips, topo.chips_per_host) == (libtpu_name, chips, per_host)
    assert topo.wrap == (wrap,) * 3


@pytest.mark.parametrize("name", ["v5p-12", "v5e-3", "v7-8", "v5p:2x2", "tpu"])
def test_bad_topology_names_fail_in_one_line(name: str) -> None:
    with pytest.raises(TopologyError, match="topology") as info:
        parse_topology(name)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def tiny_report() -> aot.CompileReport:
    cfg = load_config(TINY, MESH_2X2X2)
    return aot.compile_for_topology(cfg, "v5e-8", label="tiny")


@needs_libtpu
def test_tiny_train_step_compiles_for_v5e_8(tiny_report: aot.CompileReport) -> None:
    r = tiny_report
    assert (r.devices, r.hosts, r.mesh) == (8, 1, {"data": 2, "fsdp": 2, "tensor": 2})
    assert (r.global_batch, r.seq_len) == (8, 32)
    assert r.params == r.trainable > 0
    sizes = (r.argument_bytes, r.output_bytes, r.alias_bytes, r.peak_bytes)
    # Temporaries are not checked: libtpu fits this tiny step's into donated buffers (0 B).
    assert all(size > 0 for size in sizes)
    assert r.peak_bytes >= r.argument_bytes
    assert r.peak_bytes <= r.hbm_bytes == 16 * aot.GiB
    assert r.headroom_bytes == r.hbm_bytes - r.peak_bytes > 0
    # XLA counts each scanned layer stack once: the same order as the analytic count.
    assert 0.1 * r.model_flops < r.xla_flops * r.devices < 2 * r.model_flops
    assert r.compile_seconds > 0
    table = r.table()
    assert "v5e-8 (v5e:2x4, 1 host)" in table and "data=2 x fsdp=2 x tensor=2" in table


@needs_libtpu
def test_multi_host_compile_takes_the_global_batch_that_training_takes() -> None:
    """data.batch_size is the global batch: compiled for v5p-16 (2 hosts x 4 chips), the
    step takes the 8 rows that `sfm train` on 2 processes x 4 devices with this same config
    takes (test_train.py::test_two_hosts_match_one_host checks that side)."""
    cfg = load_config(TINY, MESH_2X2X2)
    r = aot.compile_for_topology(cfg, "v5p-16", label="tiny")
    assert (r.hosts, r.devices, r.global_batch, cfg.data.batch_size) == (2, 8, 8, 8)
    assert "batch                 8 x 32 frames" in r.table()


@needs_libtpu
def test_a_global_batch_that_does_not_divide_over_the_hosts_is_refused() -> None:
    cfg = load_config(TINY, ["data.batch_size=6", "mesh.ici_data=2", "mesh.ici_fsdp=1"])
    batch = aot.abstract_batch(cfg, LMTask(), build_mesh(cfg.mesh, jax.devices()[:2]))
    assert batch["tokens"].shape == (6, cfg.lm.n_streams, 32)  # one host, 2-way: fine
    v5p_32 = topology_devices(parse_topology("v5p-32"))  # 4 hosts x 4 chips
    four_hosts = build_mesh(load_config(TINY, ["mesh.ici_data=2", "mesh.ici_fsdp=-1"]).mesh, v5p_32)
    with pytest.raises(ConfigError, match=r"data.batch_size: the global batch 6 must divide"):
        aot.abstract_batch(cfg, LMTask(), four_hosts)


@needs_libtpu
@pytest.mark.slow
def test_the_codec_task_compiles_with_its_own_batch() -> None:
    """The abstract batch comes from the task: crops of audio for the codec."""
    small = ["codec_train.disc.n_ffts=[256]", "codec_train.mel_scales=[[256, 32]]"]
    cfg = load_config(ROOT / "configs" / "train" / "tiny_codec.yaml", small)
    r = aot.compile_for_topology(cfg, "v5e-4", label="tiny_codec")
    assert (r.global_batch, r.seq_len, r.unit) == (8, 6000, "samples")
    assert r.trainable > 0 and r.peak_bytes <= r.hbm_bytes
    assert "batch                 8 x 6000 samples" in r.table()


@needs_libtpu
def test_7b_without_fsdp_is_out_of_hbm_on_v5e_4() -> None:
    data_parallel = ["mesh.ici_data=-1", "mesh.ici_fsdp=1", "data.batch_size=4", "data.seq_len=250"]
    cfg = load_config(MOSHI_7B, data_parallel)
    with pytest.raises(
        aot.AotError,
        match=r"moshi_7b on v5e-4 \(mesh data=4 fsdp=1 tensor=1, batch 4 x 250\): out of HBM",
    ) as info:
        aot.compile_for_topology(cfg, "v5e-4", label="moshi_7b")
    assert "\n" not in str(info.value)


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """`sfm compile` sets defaults for these (sfm.host.configure(compile_only=True)); undo
    them after the test, and keep the persistent compilation cache off."""
    for var in ("JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SFM_COMPILE_CACHE", "off")


@pytest.mark.usefixtures("cli_env")
def test_cli_names_a_bad_topology(capsys: pytest.CaptureFixture[str]) -> None:
    assert aot.run(str(TINY), "v5p-12", []) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: topology 'v5p-12'") and "\n" not in err


@pytest.mark.usefixtures("cli_env")
def test_cli_rejects_a_bad_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert aot.run(str(TINY), "v5e-8", ["train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err


@needs_libtpu
@pytest.mark.slow
@pytest.mark.usefixtures("cli_env")
def test_python_m_sfm_train_aot_is_sfm_compile() -> None:
    argv = ["tiny_pretrain", "--topology", "v5p-8", "mesh.ici_data=1", "mesh.ici_fsdp=4"]
    env = {**os.environ, "SFM_COMPILE_CACHE": "off"}
    out = subprocess.run(
        [sys.executable, "-m", "sfm.train.aot", *argv], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "v5p-8 (v5:2x2x1, 1 host)" in out.stdout and "peak / device" in out.stdout


@needs_libtpu
@pytest.mark.usefixtures("cli_env")
def test_sfm_compile_prints_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compile", str(TINY), "--topology", "v5e-4", "mesh.ici_data=2", "mesh.ici_fsdp=2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "v5e-4 (v5e:2x2, 1 host)" in out and "data=2 x fsdp=2 x tensor=1" in out
    assert "peak / device" in out


@pytest.mark.usefixtures("cli_env")
def test_sfm_compile_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["compile", str(TINY), "--topology", "v5p-12"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sfm: error: topology 'v5p-12'") and "\n" not in err
    assert cli.main(["compile", str(TINY), "--topology", "v5e-8", "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err


def _by_path(tree: object) -> dict[str, jax.ShapeDtypeStruct]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_lora_adapters_are_sharded_like_their_kernels_and_moments_follow() -> None:
    """On (data, fsdp, tensor) = (2, 2, 2) no adapter is replicated: the rank dim takes the
    logical axis of the kernel dim it replaces (in_proj's B [layers, steps, qkv, rank] splits
    its rank over fsdp as qkv is replicated); AdamW's moments have their parameter's sharding."""
    cfg = load_config(DUPLEX, [*MESH_2X2X2, "train.lora_rank=8"])
    parts = aot.abstract_parts(cfg, LMTask(), build_mesh(cfg.mesh, jax.devices()[:8]))
    params = _by_path(parts.params)
    attn, mlp = "['transformer']['layers']['self_attn']", "['transformer']['layers']['gating']"
    expected = {
        f"{attn}['in_proj']['lora_a'].value": P(None, None, None, "fsdp"),  # [L, 1, r, embed]
        f"{attn}['in_proj']['lora_b'].value": P(None, None, None, "fsdp"),  # [L, 1, qkv, r]
        f"{attn}['out_proj']['lora_a'].value": P(None, None, "fsdp", None),  # [L, 1, r, qkv]
        f"{mlp}['linear_in']['lora_a'].value": P(None, None, "tensor", "fsdp"),  # [L, 1, r, e]
        f"{mlp}['linear_in']['lora_b'].value": P(None, None, "tensor", "fsdp"),  # [L, 1, mlp, r]
    }
    assert {path: params[path].sharding.spec for path in expected} == expected
    assert len(params) == 16 and "['lora_" in "".join(params)  # adapters only are trained
    assert not [path for path, x in params.items() if x.sharding.is_fully_replicated]
    adam = parts.opt_state[1][0]
    for moments in (_by_path(adam.mu), _by_path(adam.nu)):
        assert {k: x.sharding for k, x in moments.items()} == {
            k: x.sharding for k, x in params.items()
        }


def test_train_step_shards_activations_over_the_batch_axes() -> None:
    """The lowered step constrains activations [B, T, D] to (data, fsdp) on the batch dim;
    the model alone, outside the step's `activation_sharding`, lowers without constraints."""
    cfg = load_config(TINY, MESH_2X2X2)
    mesh = build_mesh(cfg.mesh, jax.devices()[:8])
    task = LMTask()
    parts = aot.abstract_parts(cfg, task, mesh)
    step = build_train_step(parts, task.loss_fn(cfg), cfg.train)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parts.shardings["replicated"])
    args = (parts.params, parts.mutable, parts.frozen, parts.opt_state)
    text = step.lower(*args, aot.abstract_batch(cfg, task, mesh), rng).as_text()
    constraints = [line for line in text.splitlines() if "sdy.sharding_constraint" in line]
    batch_btd = '[{"data", "fsdp"}, {}, {}]>'
    assert sum(batch_btd in line for line in constraints) >= 4  # embedding, layers, output
    assert any('[{"data", "fsdp"}, {}, {"tensor"}]>' in line for line in constraints)  # logits

    graphdef, state = nnx.split(nnx.eval_shape(lambda: LM(cfg.lm, rngs=nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((2, cfg.lm.n_streams, 8), jnp.int32)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).text_logits)
    plain = forward.lower(state, tokens).as_text()
    assert "sharding_constraint" not in plain


@needs_libtpu
@pytest.mark.usefixtures("cli_env")
def test_a_mesh_that_does_not_suit_the_topology_is_a_config_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["compile", str(TINY), "--topology", "v5e-4", "mesh.ici_data=3"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sfm: error: ") and "mesh.ici_data" in err and "v5e-4" in err
