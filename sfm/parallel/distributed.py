"""Start JAX's multi-process runtime from the environment (TPU pods, or SFM_* variables).

Call `initialize_from_env()` first thing in a program, before any JAX computation:
- `SFM_COORDINATOR` (host:port), `SFM_NUM_PROCESSES`, `SFM_PROCESS_ID` set: those are used
  (explicit settings win over detection; CPU collectives go through gloo);
- else on a Cloud TPU VM inside a pod (GCE or GKE): JAX detects everything itself;
- else a single process: nothing to do.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax

from sfm.errors import SfmError

try:  # private JAX modules: detect a Cloud TPU pod before initializing; the job's client
    from jax._src import cloud_tpu_init as _cloud_tpu_init
    from jax._src import clusters as _clusters
    from jax._src import distributed as _distributed
except ImportError:  # pragma: no cover - depends on the JAX version
    _cloud_tpu_init = None
    _clusters = None
    _distributed = None


class LaunchError(SfmError, ValueError):
    """The launcher's environment variables are incomplete or malformed; one line names them."""


ENV_COORDINATOR = "SFM_COORDINATOR"
ENV_NUM_PROCESSES = "SFM_NUM_PROCESSES"
ENV_PROCESS_ID = "SFM_PROCESS_ID"
_ENV_VARS = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """Where this process stands in the job."""

    process_index: int
    process_count: int
    local_device_count: int


@dataclasses.dataclass(frozen=True)
class _EnvSettings:
    coordinator: str
    num_processes: int
    process_id: int


def initialize_from_env() -> DistributedInfo:
    """Initialize jax.distributed from SFM_* variables or a TPU pod; idempotent, no-op alone."""
    if not jax.distributed.is_initialized():
        settings = _env_settings()
        if settings is not None and settings.num_processes > 1:
            _initialize_explicit(settings)
        elif settings is None and _in_tpu_pod():
            logger.info("initializing jax.distributed from the TPU pod environment")
            jax.distributed.initialize()
    return DistributedInfo(jax.process_index(), jax.process_count(), jax.local_device_count())


def barrier(name: str, timeout_s: float = 1800.0) -> None:
    """Wait until every process of the job reaches `name`; no-op in a single process.

    This is the coordination service's barrier, not a device collective. Processes that reach
    their first collective at different times (one compiled slower) fail on CPU: gloo's
    rendezvous gives up after ~30 s. Meeting here first, after compiling, keeps them together.
    """
    if jax.process_count() == 1:
        return
    client = None if _distributed is None else _distributed.global_state.client
    if client is None:  # pragma: no cover - several processes always have a client
        raise LaunchError("jax.distributed has no client: initialize_from_env() was not called")
    client.wait_at_barrier(name, int(timeout_s * 1000))


def _env_settings() -> _EnvSettings | None:
    """Read the SFM_* variables: all three or none, with a clear error otherwise."""
    present = {name: os.environ[name] for name in _ENV_VARS if os.environ.get(name)}
    if not present:
        return None
    missing = [name for name in _ENV_VARS if name not in present]
    if missing:
        raise LaunchError(f"{', '.join(missing)}: must be set together with {', '.join(present)}")
    num_processes = _env_int(ENV_NUM_PROCESSES, present[ENV_NUM_PROCESSES])
    process_id = _env_int(ENV_PROCESS_ID, present[ENV_PROCESS_ID])
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise LaunchError(
            f"{ENV_PROCESS_ID}: {process_id} is not in [0, {ENV_NUM_PROCESSES}={num_processes})"
        )
    if ":" not in present[ENV_COORDINATOR]:
        raise LaunchError(
            f"{ENV_COORDINATOR}: expected host:port, got {present[ENV_COORDINATOR]!r}"
        )
    return _EnvSettings(present[ENV_COORDINATOR], num_processes, process_id)


def _env_int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise LaunchError(f"{name}: expected an integer, got {text!r}") from None


def _initialize_explicit(settings: _EnvSettings) -> None:
    """Initialize from explicit settings; CPU backends exchange collectives through gloo."""
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logger.info(
        "initializing jax.distributed: process %d of %d, coordinator %s",
        settings.process_id,
        settings.num_processes,
        settings.coordinator,
    )
    jax.distributed.initialize(
        settings.coordinator, num_processes=settings.num_processes, process_id=settings.process_id
    )


def _in_tpu_pod() -> bool:
    """True on a Cloud TPU VM whose GCE or GKE cluster environment JAX can detect."""
    if _clusters is None or not getattr(_cloud_tpu_init, "running_in_cloud_tpu_vm", False):
        return False
    detectors = (_clusters.GkeTpuCluster, _clusters.GceTpuCluster)
    try:
        return any(env.is_env_present() for env in detectors)
    except OSError as err:  # metadata server unreachable: treat as a single host
        logger.warning("TPU cluster detection failed (%s); running as a single process", err)
        return False
