"""sfm: a JAX speech foundation model library (Mimi-compatible codec, Moshi-class LM)."""

import flax

# Parameters are placed by the logical-axis rules in `sfm.parallel`, never at creation time.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
