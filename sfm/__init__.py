"""sfm: a JAX speech foundation model library (Mimi-compatible codec, Moshi-class LM)."""

import glob
import os


def _cpu_only_host() -> bool:
    """True on a machine without TPU chips (/dev/accel*, /dev/vfio) or NVIDIA GPUs."""
    accelerators = glob.glob("/dev/accel*") + glob.glob("/dev/nvidia*")
    return not (accelerators or os.path.exists("/dev/vfio"))


# With libtpu installed (the `tpu` extra, for ahead-of-time compilation) jax probes for TPU
# chips at start-up and logs errors on a machine that has none. An explicit JAX_PLATFORMS wins.
if "JAX_PLATFORMS" not in os.environ and _cpu_only_host():
    os.environ["JAX_PLATFORMS"] = "cpu"

from sfm.host import configure_for_cpu  # noqa: E402

# XLA:CPU re-faults its temporaries in at every step unless freed memory is kept (sfm.host).
configure_for_cpu()

import flax  # noqa: E402 - after the platform choice, which must precede importing jax

# Parameters are placed by the logical-axis rules in `sfm.parallel`, never at creation time.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
