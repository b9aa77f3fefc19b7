"""sfm: a JAX speech foundation model library (Mimi-compatible codec, Moshi-class LM).

Importing sfm changes nothing process-wide. A program that runs sfm (the `sfm` command, the
tests, the benchmarks) calls `sfm.host.configure()` once, before jax is imported: it picks the
CPU platform on a host without accelerators and tunes XLA:CPU (see `sfm.host`).
"""

__version__ = "0.1.0"
