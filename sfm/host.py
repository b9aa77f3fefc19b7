"""Process-wide host settings: the jax platform, XLA:CPU memory reuse and worker threads.

`configure()` applies all of them; programs call it once, first (before jax is imported),
and `import sfm` alone applies none. Library users who drive jax themselves may skip it, or
call it the same way:

    import sfm.host
    sfm.host.configure()  # before `import jax`
    import jax

Platform. With libtpu installed (the `tpu` extra, for ahead-of-time compilation) jax probes for
TPU chips at start-up and logs errors on a machine that has none, so on a host without TPU
chips or NVIDIA GPUs `configure` sets JAX_PLATFORMS=cpu. A JAX_PLATFORMS of the user's wins.
`configure(compile_only=True)` (`sfm compile`, which only compiles for other machines) picks
the CPU platform on any host and keeps libtpu's host discovery local (TPU_WORKER_HOSTNAMES).

Memory. XLA:CPU allocates the temporaries of an executable afresh at every call (one block,
~130 MiB for a small LM's training step). glibc serves a block that large with mmap and hands
it back with munmap, so every step page-faults all of it in again: about 2 us per 4 KiB page
on a virtual machine, tens of milliseconds a step. With one malloc arena (XLA's worker threads
otherwise get arenas of their own, which always mmap large blocks), no mmap for large blocks
and no trimming, the freed block stays in the heap and the next step reuses it. The cost:
freed memory is not returned to the system while the process runs, so the resident size stays
at its peak. `sfm` applies this on CPU-only runs unless SFM_HOST_MEMORY=system.

Threads. A simulated mesh (--xla_force_host_platform_device_count=N) runs its devices'
programs and their in-process collectives on one pool of worker threads, N of them by default.
A collective holds its thread until every device has joined it. When the devices start two
independent collectives in different orders, all N threads can end up waiting in collectives
whose missing participant has no thread left to run on; XLA aborts the process after 40 s
("Termination timeout ... rendezvous"). `sfm` sizes the pool at 4 threads per simulated device
(NPROC, which XLA reads when it creates the CPU client) unless NPROC is set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import re

from sfm.errors import SfmError


class HostSettingError(SfmError, ValueError):
    """An environment variable that sfm reads has a bad value; the message names it."""


# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # the largest int mallopt takes: 2 GiB of free heap top

_retained = False
THREADS_PER_SIMULATED_DEVICE = 4
_NPROC_MARK = "SFM_SET_NPROC"  # the NPROC value sfm set, so that child processes redo it
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


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


def simulated_devices() -> int:
    """CPU devices jax will create: JAX_NUM_CPU_DEVICES, else the XLA_FLAGS device count."""
    if os.environ.get("JAX_NUM_CPU_DEVICES"):
        return int(os.environ["JAX_NUM_CPU_DEVICES"])
    found = _DEVICE_COUNT_FLAG.findall(os.environ.get("XLA_FLAGS", ""))
    return int(found[-1]) if found else 1


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def widen_collective_thread_pool() -> int | None:
    """Set NPROC for a simulated mesh as described above; returns the value set, or None
    (one device, or an NPROC of the user's). Call it before jax creates its CPU client.

    A child process inherits the NPROC set here; it is recomputed for the child's own device
    count (and dropped for one device), while an NPROC set by the user is left alone."""
    ours = os.environ.get(_NPROC_MARK)
    if "NPROC" in os.environ and os.environ["NPROC"] != ours:
        return None
    devices = simulated_devices()
    if devices < 2:
        if ours is not None:
            os.environ.pop("NPROC", None)
            os.environ.pop(_NPROC_MARK)
        return None
    threads = str(max(usable_cpus(), THREADS_PER_SIMULATED_DEVICE * devices))
    os.environ["NPROC"] = os.environ[_NPROC_MARK] = threads
    return int(threads)


def configure_for_cpu() -> bool:
    """For a CPU-only jax (JAX_PLATFORMS=cpu): `widen_collective_thread_pool`, and
    `retain_freed_memory` unless SFM_HOST_MEMORY=system (True when that was applied)."""
    choice = os.environ.get("SFM_HOST_MEMORY", "retain")
    if choice not in ("retain", "system"):
        raise HostSettingError(f"SFM_HOST_MEMORY: must be 'retain' or 'system', got {choice!r}")
    if os.environ.get("JAX_PLATFORMS", "") != "cpu":
        return False
    widen_collective_thread_pool()
    return choice == "retain" and retain_freed_memory()


def cpu_only_host() -> bool:
    """True on a machine without TPU chips (/dev/accel*, /dev/vfio) or NVIDIA GPUs."""
    accelerators = glob.glob("/dev/accel*") + glob.glob("/dev/nvidia*")
    return not (accelerators or os.path.exists("/dev/vfio"))


def configure(*, compile_only: bool = False) -> None:
    """Apply sfm's process-wide settings (module docstring); call before importing jax.

    Sets JAX_PLATFORMS=cpu on a host without accelerators (unless set), then, for a CPU-only
    jax, `configure_for_cpu`. `compile_only`: the process only compiles for other machines
    (`sfm compile`), so jax stays on the CPU even where accelerators are, and libtpu's host
    discovery stays local. Calling it again with the same arguments changes nothing more."""
    if compile_only:
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if "JAX_PLATFORMS" not in os.environ and (compile_only or cpu_only_host()):
        os.environ["JAX_PLATFORMS"] = "cpu"
    configure_for_cpu()
