"""Host memory on CPU: a large block freed by a worker thread is reused without page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sfm.host import configure_for_cpu

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
