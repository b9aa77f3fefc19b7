"""Pallas kernels, each beside its pure-JAX reference.

- `depth`: the depth transformer's whole frame with sampling (`reference`, and the fused
  TPU kernel in `depth_tpu`); `sampling`: the in-kernel sampler both use.
- `grouped_matmul`: the per-codebook projections of training, y[k] = x[k] @ w[k].T.
- `attention`: the temporal transformer's attention through JAX's own kernels.

One switch, `lm.attention_impl`, picks: "xla" runs the references (every backend; the
default), "pallas" the kernels (on CPU through the Pallas interpreter, for tests).
"""
