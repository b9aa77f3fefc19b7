"""Test set-up: eight simulated CPU devices and sfm's host settings (both before anything
imports jax), and the slow marker.

Tests run on CPU even where libtpu is installed (the `tpu` extra, used for ahead-of-time
compilation): without `JAX_PLATFORMS=cpu` jax would probe for TPU chips at start-up.
"""

import os
from collections.abc import Iterator

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402 - the device count must be set before anything imports jax

import sfm.host  # noqa: E402

sfm.host.configure()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module's PyTorch reference runs: on a busy 2-core machine,
    2 threads make moshi up to 10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
