"""The Mosaic GPU depth-frame kernel (`sfm.kernels.depth_gpu`) on a CPU host: its tokens
against the reference's in the Mosaic GPU interpreter (shared memory, TMA copies,
barriers and wgmma simulated, race detection on), and its lowering for CUDA at the
published depth shapes (Mosaic GPU's layout inference and lowering run; only the PTX
compile needs a GPU).

Tolerance: the kernel rounds where the reference rounds (every product's result to the
compute dtype) but sums in another order, so a rounding may differ by one unit in the last
place. Given the same codes, the kernel's logits are the reference's within one unit at
their scale (eps of the dtype x max |logit|), the TPU kernel's bound: empirical (the units
could add up over layers), and what the draws' margin below rests on. The reference scores the
kernel's own tokens (`given_bp`: the same prefixes at every
position), and the kernel's token must be the reference's draw wherever that draw is clear:
its winner leads the runner-up by more than two units at the logits' scale (eps of the
dtype x max |logit|; over the temperature for sampled draws) and, sampling, the top-k cut
has the same margin. At least 20 of a frame's tokens must be clear (random tiny models put
many logits within two bfloat16 units of each other)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

from sfm.kernels.depth import DepthWeights, depth_frame, reference
from sfm.kernels.depth_gpu import BT, depth_frame_gpu, supports
from sfm.kernels.sampling import effective_top_k, sample_rows, uniform
from sfm.kernels.sampling_gpu import sample_columns
from sfm.lm.config import DepthConfig, LMConfig, TemporalConfig, moshi_delays
from sfm.lm.fused_depth import depth_weights
from sfm.lm.model import LM

ROOT = Path(__file__).resolve().parents[1]
TEMPORAL = TemporalConfig(dim=64, num_heads=1, num_layers=1, dim_feedforward=96, context=8)
DEPTHS = {  # feature sizes in whole 64-row tiles; hidden = 2/3 dim_feedforward = 128
    "moshi": DepthConfig(dim=64, num_heads=1, num_layers=2, dim_feedforward=192),
    "csm": DepthConfig(
        kind="csm", max_period=10000.0, dim=512, num_heads=4, num_kv_heads=2, num_layers=1,
        dim_feedforward=192,
    ),  # grouped heads (two per kv head), head_dim 128 (two 64-row chunks), RoPE
}  # fmt: skip


def _weights(kind: str, positions: int, card: int, dtype: str) -> DepthWeights:
    cfg = LMConfig(
        text_card=50, card=card, n_q=positions, dep_q=positions, delays=moshi_delays(positions),
        temporal=TEMPORAL, depth=DEPTHS[kind],
    )  # fmt: skip
    w = depth_weights(LM(cfg, rngs=nnx.Rngs(0)))
    return jax.tree.map(lambda a: a.astype(dtype), w)


def _inputs(w: DepthWeights, batch: int) -> tuple[jax.Array, ...]:
    dtype = w.wqkv.dtype
    h = jax.random.normal(jax.random.key(1), (batch, w.w_in.shape[-1])).astype(dtype)
    first = jax.random.normal(jax.random.key(4), (batch, w.dim)).astype(dtype)
    seeds = jax.random.randint(jax.random.key(2), (batch, 2), -(2**31), 2**31 - 1, jnp.int32)
    temp = jnp.linspace(-0.5, 1.5, batch).reshape(batch, 1)  # some rows argmax
    top_k = effective_top_k(jnp.arange(batch) % 7, 5, w.vocab)
    top_k = jnp.where(jnp.arange(batch)[:, None] % 3 == 0, w.vocab, top_k)  # some untruncated
    return h, first, seeds, temp, top_k


CASES = [
    # kind, positions, card, batch, dtype, logits in SMEM
    ("moshi", 3, 100, 60, "bfloat16", True),  # two layers, a padded vocabulary
    ("moshi", 2, 64, BT + 1, "float16", False),  # two batch tiles; logits in global memory
    ("csm", 3, 70, 40, "bfloat16", False),  # grouped heads, RoPE, head_dim 128
]


@pytest.mark.parametrize(("kind", "positions", "card", "batch", "dtype", "in_smem"), CASES)
def test_gpu_kernel_equals_reference_in_the_interpreter(
    kind: str, positions: int, card: int, batch: int, dtype: str, in_smem: bool
) -> None:
    w = _weights(kind, positions, card, dtype)
    args = _inputs(w, batch)
    races = InterpretGPUParams(detect_races=True)
    for greedy in (True, False):
        gpu_interpret.reset_gpu_interpret_mode_state()
        got = jax.jit(
            lambda *a, greedy=greedy: depth_frame_gpu(
                *a, greedy=greedy, interpret=races, logits_in_smem=in_smem
            )
        )(w, *args)
        assert not gpu_interpret.get_races().races_found
        _assert_clear_draws_agree(w, args, np.asarray(got), greedy)
    assert len(np.unique(np.asarray(got))) > 3  # the frame's tokens are not all alike
    # the logits given the reference's greedy codes
    codes = reference(w, *args, greedy=True)
    gpu_interpret.reset_gpu_interpret_mode_state()
    _, logits = jax.jit(
        lambda *a: depth_frame_gpu(
            *a, greedy=True, interpret=races, logits_in_smem=in_smem, given_bp=codes
        )
    )(w, *args)
    assert not gpu_interpret.get_races().races_found
    _, want = reference(w, *args, greedy=True, given_bp=codes)
    scale = float(np.abs(np.asarray(want)).max())
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(want), rtol=0, atol=float(jnp.finfo(dtype).eps) * scale
    )


def _assert_clear_draws_agree(
    w: DepthWeights, args: tuple[jax.Array, ...], got_bp: np.ndarray, greedy: bool
) -> None:
    """See the module docstring: the reference's draw on the kernel's prefixes, where clear."""
    _, logits = reference(w, *args, greedy=greedy, given_bp=jnp.asarray(got_bp))
    logits_pbv = np.asarray(logits, np.float64)
    tol = 2 * float(jnp.finfo(w.wqkv.dtype).eps) * np.abs(logits_pbv).max()
    _, _, seeds, temp, top_k = (np.asarray(a) for a in args)
    p, b, v = logits_pbv.shape
    clear = np.zeros((b, p), bool)
    want = np.zeros((b, p), np.int64)
    for j in range(p):
        x = logits_pbv[j]
        score, margin = x, np.full(b, np.inf)
        if not greedy:
            ordered = -np.sort(-x, axis=1)
            k = top_k[:, 0]
            kth, after = ordered[np.arange(b), k - 1], ordered[np.arange(b), np.minimum(k, v - 1)]
            margin = np.where(k < v, kth - after, np.inf)
            u = np.asarray(uniform(jnp.asarray(seeds[:, :1]), jnp.asarray(seeds[:, 1:]), j, v))
            t = temp[:, :1]
            drawn = np.where(
                x >= kth[:, None], x / np.where(t > 0, t, 1) - np.log(-np.log(u)), -np.inf
            )
            score = np.where(t > 0, drawn, x)
            tol_j = np.where(t[:, 0] > 0, tol / np.where(t[:, 0] > 0, t[:, 0], 1), tol)
        else:
            tol_j = np.full(b, tol)
        top2 = -np.sort(-score, axis=1)[:, :2]
        clear[:, j] = (top2[:, 0] - top2[:, 1] > tol_j) & (margin > tol)
        want[:, j] = np.argmax(score, axis=1)
    np.testing.assert_array_equal(got_bp[clear], want[clear], err_msg=f"{greedy=}")
    assert clear.sum() >= 20, clear.sum()


def _bench() -> object:
    sys.path.insert(0, str(ROOT / "bench"))
    import depth_kernels

    return depth_kernels


def _custom_calls(
    platform: str, w: DepthWeights, *args: object, greedy: bool, given: object = None
) -> set[str]:
    """The custom calls of `depth_frame(impl="pallas")` lowered for `platform`."""

    def frame(w: DepthWeights, *a: jax.Array) -> object:
        if given is None:
            return depth_frame(w, *a, impl="pallas", greedy=greedy)
        return depth_frame(w, *a[:-1], impl="pallas", greedy=greedy, given_bp=a[-1])

    extra = () if given is None else (given,)
    text = jax.export.export(jax.jit(frame), platforms=[platform])(w, *args, *extra).mlir_module()
    return set(re.findall(r"stablehlo.custom_call @(\w+)", text))


@pytest.mark.parametrize("kind", ["moshi", "csm"])
def test_depth_frame_lowers_its_kernels_for_cuda_and_tpu(kind: str) -> None:
    """Moshi 7B's and CSM's depth transformers (bench/depth_kernels.py shapes), batch 16:
    `depth_frame(impl="pallas")` lowered for CUDA carries the Mosaic GPU kernel (greedy and
    sampled), for TPU the Mosaic one, both from the same traced program (its CPU branch,
    the interpreted kernel, has no side effects that would stop the others lowering).
    Scoring given codes lowers the kernel too; float32 lowers the reference on the GPU."""
    bench = _bench()
    w = bench.depth_shapes(kind)  # type: ignore[attr-defined]
    args = bench.frame_args(w, 16)  # type: ignore[attr-defined]
    for greedy in (True, False):
        assert _custom_calls("cuda", w, *args, greedy=greedy) == {"mosaic_gpu_v2"}
    assert _custom_calls("tpu", w, *args, greedy=False) == {"tpu_custom_call"}
    w32 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), w)
    args32 = (jax.ShapeDtypeStruct(args[0].shape, jnp.float32), *args[1:])
    assert _custom_calls("cuda", w32, *args32, greedy=True) == set()
    given = jax.ShapeDtypeStruct((16, w.positions), jnp.int32)
    assert _custom_calls("cuda", w, *args, greedy=True, given=given) == {"mosaic_gpu_v2"}


def test_supports_names_what_the_kernel_cannot_run() -> None:
    w = _weights("moshi", 2, 64, "bfloat16")
    assert supports(w, jnp.bfloat16) is None
    assert "float32" in str(supports(w, jnp.float32))
    odd = DepthWeights(**{**w.__dict__, "w_in": jnp.zeros((2, 64, 96), jnp.bfloat16)})
    assert "temporal dim 96" in str(supports(odd, jnp.bfloat16))
    with pytest.raises(ValueError, match="temporal dim 96"):
        depth_frame_gpu(odd, *_inputs(odd, 2), greedy=True, interpret=True)


def test_column_sampler_equals_the_row_sampler() -> None:
    """`sample_columns` on [V, B] tiles draws `sample_rows`'s tokens exactly (plain JAX, the
    same logits): ties on a coarse grid, a vocabulary padded to whole tiles (100 -> 128),
    every k from 1 to V, temperatures <= 0 (argmax), all-equal and all-negative rows."""
    v, b = 100, 64
    logits = jnp.round(jax.random.normal(jax.random.key(7), (b, v)) * 3) / 2  # many ties
    logits = logits.at[1].set(0.0).at[2].set(-jnp.abs(logits[2]) - 1)
    seeds = jax.random.randint(jax.random.key(8), (b, 2), -(2**31), 2**31 - 1, jnp.int32)
    temp = jnp.where(jnp.arange(b) % 4 == 0, 0.0, 0.5 + jnp.arange(b) / b)
    top_k = (jnp.arange(b) * 7 % v + 1).at[5].set(v).astype(jnp.int32)
    padded = jnp.pad(logits.T, ((0, 128 - v), (0, 0)), constant_values=1e9)  # never drawn

    def load(t: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice_in_dim(padded, t * 64, 64, axis=0)

    for greedy in (True, False):
        for position in (0, 3):
            want = sample_rows(
                logits, seeds, position, temp[:, None], top_k[:, None], greedy=greedy
            )
            got = sample_columns(
                load, 2, b, v, seeds[:, 0], seeds[:, 1], jnp.int32(position), temp, top_k,
                greedy=greedy,
            )  # fmt: skip
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want[:, 0]))
