"""Host memory for XLA:CPU: keep freed memory in the process for the next step to reuse.

XLA:CPU allocates the temporaries of an executable afresh at every call (one block, ~130 MiB
for a small LM's training step). glibc serves a block that large with mmap and hands it back
with munmap, so every step page-faults all of it in again: about 2 us per 4 KiB page on a
virtual machine, tens of milliseconds a step. With one malloc arena (XLA's worker threads
otherwise get arenas of their own, which always mmap large blocks), no mmap for large blocks
and no trimming, the freed block stays in the heap and the next step reuses it.

The cost: freed memory is not returned to the system while the process runs, so the resident
size stays at its peak. `sfm` applies this on CPU-only runs unless SFM_HOST_MEMORY=system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # the largest int mallopt takes: 2 GiB of free heap top

_retained = False


def retained() -> bool:
    """Whether `retain_freed_memory` took effect in this process."""
    return _retained


def retain_freed_memory() -> bool:
    """Configure glibc malloc as described above; False where it is not glibc (nothing done).

    Call it before the threads that allocate exist (before jax runs anything): threads that
    already have an arena keep it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global _retained
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    _retained = all(mallopt(param, value) == 1 for param, value in settings)
    return _retained


def configure_for_cpu() -> bool:
    """`retain_freed_memory` for a CPU-only jax (JAX_PLATFORMS=cpu) unless
    SFM_HOST_MEMORY=system; True when applied."""
    choice = os.environ.get("SFM_HOST_MEMORY", "retain")
    if choice not in ("retain", "system"):
        raise ValueError(f"SFM_HOST_MEMORY must be 'retain' or 'system', got {choice!r}")
    if choice == "system" or os.environ.get("JAX_PLATFORMS", "") != "cpu":
        return False
    return retain_freed_memory()
