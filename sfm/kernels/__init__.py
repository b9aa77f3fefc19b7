"""Pallas kernels, each beside its pure-JAX reference.

- `depth`: the depth transformer's whole frame with sampling (`reference`; the fused Mosaic
  TPU kernel in `depth_tpu`, the Mosaic GPU one in `depth_gpu`); `sampling`: the in-kernel
  sampler they use (`sampling_gpu`: its column-wise form for the GPU kernel).
- `grouped_matmul`: the per-codebook projections of training, y[k] = x[k] @ w[k].T
  (megablox on TPU, `jax.lax.ragged_dot` on GPU).
- `attention`: the temporal transformer's teacher-forced attention through JAX's own
  kernels (splash on TPU, cuDNN on GPU).

One switch, `lm.attention_impl`, picks: "xla" runs the references (every backend; the
default), "pallas" the kernels. Each kernel is chosen where the program is lowered
(`jax.lax.platform_dependent`), so an ahead-of-time TPU compile on a CPU host gets the
Mosaic kernels; run on CPU they go through an interpreter (the depth frame Pallas's
generic one, the others the TPU kernels' own; the tests also run the GPU kernel in the
Mosaic GPU interpreter and lower it for CUDA on the CPU).
"""
