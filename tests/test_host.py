"""Host memory on CPU: a large block freed by a worker thread is reused without page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sfm import host
from sfm.host import (
    configure_for_cpu,
    simulated_devices,
    usable_cpus,
    widen_collective_thread_pool,
)

BLOCK_MIB = 96  # above glibc's largest mmap threshold (32 MiB): always mmapped by default

# Allocates, touches and frees one block from a new thread (as XLA:CPU's workers do with an
# executable's temporaries), four times; prints the page faults of the last three rounds.
SCRIPT = f"""
import ctypes, json, resource, sys, threading
if sys.argv[1] == "retain":
    from sfm.host import retain_freed_memory
    assert retain_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = {BLOCK_MIB} << 20
faults = []
def rounds():
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(json.dumps(faults[1:]))
"""


def faults_per_round(mode: str) -> list[int]:
    env = {**os.environ, "SFM_HOST_MEMORY": "system"}  # importing sfm must not apply it
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def transparent_hugepages_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_block_is_reused_without_page_faults() -> None:
    pages = (BLOCK_MIB << 20) // os.sysconf("SC_PAGESIZE")
    retained = faults_per_round("retain")
    assert max(retained) < pages // 100, (retained, pages)
    if not transparent_hugepages_always():  # with 4 KiB pages the default re-faults it all
        assert min(faults_per_round("system")) > pages // 2


def test_configure_for_cpu_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFM_HOST_MEMORY", "system")
    assert configure_for_cpu() is False
    monkeypatch.setenv("SFM_HOST_MEMORY", "retain")
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert configure_for_cpu() is False
    monkeypatch.setenv("SFM_HOST_MEMORY", "keep")
    with pytest.raises(ValueError, match="SFM_HOST_MEMORY"):
        configure_for_cpu()


def test_simulated_devices_and_the_thread_pool_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NPROC", "SFM_SET_NPROC", "JAX_NUM_CPU_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert simulated_devices() == 1
    assert widen_collective_thread_pool() is None and "NPROC" not in os.environ
    flags = "--xla_force_host_platform_device_count=2 --xla_force_host_platform_device_count=8"
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert simulated_devices() == 8
    assert widen_collective_thread_pool() == max(usable_cpus(), 32)
    assert os.environ["NPROC"] == str(max(usable_cpus(), 32))
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "16")  # a child process with other devices
    assert simulated_devices() == 16
    assert widen_collective_thread_pool() == max(usable_cpus(), 64)
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")  # ... or with one: XLA's default again
    assert widen_collective_thread_pool() is None and "NPROC" not in os.environ
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "8")
    monkeypatch.setenv("NPROC", "12")  # the user's own setting wins
    assert widen_collective_thread_pool() is None and os.environ["NPROC"] == "12"


# A sharded computation on 8 simulated devices; prints the XLA:CPU worker threads it made.
POOL_SCRIPT = """
import collections, os, sys
import sfm  # importing changes nothing process-wide ...
if sys.argv[1] == "configure":
    import sfm.host
    sfm.host.configure()  # ... configure() does
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
x = jax.device_put(jnp.ones((64, 64)), NamedSharding(mesh, P("x")))
jax.block_until_ready(jax.jit(lambda a: (a @ a.T).sum())(x))
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(sum(name.startswith("tf_XLAEigen") for name in names))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc thread names")
def test_configure_widens_the_pool_of_a_simulated_mesh_and_importing_sfm_does_not() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "SFM_SET_NPROC")}
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}

    def workers(mode: str) -> int:
        cmd = [sys.executable, "-c", POOL_SCRIPT, mode]
        return int(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)

    widened = workers("configure")
    assert widened == max(usable_cpus(), 32)
    assert workers("import") < widened  # XLA's default: one per device (or per CPU)


def test_configure_picks_the_cpu_platform_only_without_accelerators(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(host, "cpu_only_host", lambda: False)
    monkeypatch.setattr(host, "configure_for_cpu", lambda: False)
    host.configure()
    assert "JAX_PLATFORMS" not in os.environ
    monkeypatch.setattr(host, "cpu_only_host", lambda: True)
    host.configure()
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")  # the user's choice wins
    host.configure()
    assert os.environ["JAX_PLATFORMS"] == "cuda"
