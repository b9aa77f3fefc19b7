"""Pallas kernels against their references: the fused depth frame (TPU semantics in the
interpreter, race detection on), its sampler against the softmax it samples, the grouped
matmul forward and backward, generation and the engine through the kernels, and Mosaic
compiles of the kernels for real TPU chips (libtpu, no TPU needed).

Tolerances: the depth frame's tokens are compared exactly (f32 and bf16: the kernel and
the reference round at the same points, so no logit moves past a neighbour); the grouped
matmul at rtol 1e-5 (f32) and 1e-2 (bf16, its 8-bit mantissa), gradients included."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType

from sfm.codec.model import Mimi
from sfm.config import load_config, resolve_preset
from sfm.infer.engine import Engine, SessionSampling
from sfm.kernels.depth import DepthWeights, depth_frame, reference
from sfm.kernels.depth_plan import plan, vmem_bytes
from sfm.kernels.grouped_matmul import grouped_matmul
from sfm.kernels.grouped_matmul import reference as gmm_reference
from sfm.kernels.sampling import effective_top_k, sample_rows, top_k_mask
from sfm.lm.config import DepthConfig, LMConfig, TemporalConfig, moshi_delays
from sfm.lm.fused_depth import depth_weights
from sfm.lm.generate import Generator, SamplingConfig
from sfm.lm.model import LM
from sfm.nn.attention import self_attention
from sfm.parallel.rules import activation_sharding, per_batch_shard
from sfm.testing.audio import gliding_tone
from sfm.train import aot

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "depth_kernels.py"
TINY_PRETRAIN = ROOT / "configs" / "train" / "tiny_pretrain.yaml"
RACES = pltpu.InterpretParams(detect_races=True)
TEMPORAL = TemporalConfig(dim=64, num_heads=4, num_layers=2, dim_feedforward=96, context=16)
DEPTHS = {
    # hidden 256 = two 128-wide MLP chunks with block_f=128
    "moshi": DepthConfig(dim=32, num_heads=2, num_layers=2, dim_feedforward=384),
    "csm": DepthConfig(
        kind="csm", max_period=10000.0, dim=32, num_heads=4, num_kv_heads=2, num_layers=2,
        dim_feedforward=384,
    ),
}  # fmt: skip


def _lm(kind: str, dep_q: int, impl: str = "xla", scan_layers: bool = True) -> LM:
    cfg = LMConfig(
        text_card=50, card=32, n_q=dep_q, dep_q=dep_q, delays=moshi_delays(dep_q),
        temporal=TEMPORAL, depth=DEPTHS[kind], attention_impl=impl,  # type: ignore[arg-type]
    ).with_scan_layers(scan_layers)  # fmt: skip
    return LM(cfg, rngs=nnx.Rngs(0))


def _frame_inputs(lm: LM, batch: int, dtype: jnp.dtype) -> tuple[jax.Array, ...]:
    h = jax.random.normal(jax.random.key(1), (batch, lm.cfg.temporal.dim)).astype(dtype)
    text = jnp.arange(batch) % lm.cfg.text_card
    first = (
        jnp.zeros((batch, lm.cfg.depth.dim), dtype)
        if lm.cfg.depth.kind == "csm"
        else lm.depth.text_emb(text, dtype)
    )
    seeds = jax.random.randint(jax.random.key(2), (batch, 2), -(2**31), 2**31 - 1, jnp.int32)
    temp = jnp.linspace(-0.5, 1.5, batch).reshape(batch, 1)  # some rows argmax
    top_k = effective_top_k(jnp.arange(batch) % 7, 5, lm.cfg.card)
    return h, first, seeds, temp, top_k


def _cast(w: DepthWeights, dtype: jnp.dtype) -> DepthWeights:
    return jax.tree.map(lambda a: a.astype(dtype), w)


# --------------------------------------------------------------------------- sampler


def test_sampler_draws_the_truncated_softmax() -> None:
    """4096 draws of one row (one seed each): frequencies within 4.5 sigma of
    softmax(top-5 logits / 0.7), nothing outside the top 5; temp 0 is argmax."""
    vocab, rows, k, temp = 16, 4096, 5, 0.7
    logits = jax.random.normal(jax.random.key(0), (vocab,)) * 2
    block = jnp.broadcast_to(logits, (rows, vocab))
    seeds = jnp.stack([jnp.arange(rows, dtype=jnp.int32), jnp.full((rows,), 7, jnp.int32)], 1)
    tokens = sample_rows(
        block, seeds, 3, jnp.full((rows, 1), temp), jnp.full((rows, 1), k), greedy=False
    )
    counts = np.bincount(np.asarray(tokens[:, 0]), minlength=vocab) / rows
    top = np.argsort(-np.asarray(logits))[:k]
    want = np.zeros(vocab)
    want[top] = np.asarray(jax.nn.softmax(logits[top] / temp))
    sigma = np.sqrt(want * (1 - want) / rows) + 1e-9
    assert np.all(np.abs(counts - want) <= 4.5 * sigma + 1e-12), (counts, want)
    argmax = sample_rows(block[:2], seeds[:2], 3, jnp.zeros((2, 1)), jnp.full((2, 1), k),
                         greedy=False)  # fmt: skip
    assert np.all(np.asarray(argmax) == int(jnp.argmax(logits)))


def test_top_k_mask_is_lax_top_k_with_ties() -> None:
    """Exactly k kept per row, ties broken towards the lower lane, as `lax.top_k`: logits
    on a half-step grid tie often (as bfloat16 logits do)."""
    logits = jnp.round(jax.random.normal(jax.random.key(3), (64, 300)) * 2) / 2
    k = jnp.arange(1, 65).reshape(64, 1)
    _, best = jax.lax.top_k(logits, 64)
    want = np.zeros(logits.shape, bool)
    for row in range(64):
        want[row, np.asarray(best[row, : row + 1])] = True
    np.testing.assert_array_equal(np.asarray(top_k_mask(logits, k)), want)


def test_effective_top_k_reads_sessions_as_the_generator_does() -> None:
    """The engine's cap bounds a session's top-k; a cap of 0 or >= V samples everything."""
    asked = jnp.array([-1, 0, 3, 5, 9])
    for cap, want in ((5, [5, 5, 3, 5, 5]), (0, [32] * 5), (40, [32] * 5), (32, [32] * 5)):
        got = effective_top_k(asked, cap, 32)[:, 0]
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"cap {cap}")


# --------------------------------------------------------------------------- depth frame

CASES = [
    # kind, positions, batch, dtype, block_b, block_f
    ("moshi", 5, 5, "float32", None, 128),  # odd K, odd batch, two MLP chunks
    ("csm", 5, 9, "float32", 8, None),  # grouped heads + RoPE, a batch tile boundary
    ("moshi", 3, 3, "bfloat16", None, None),
    ("csm", 4, 17, "bfloat16", 16, 128),
]


@pytest.mark.parametrize(("kind", "positions", "batch", "dtype", "block_b", "block_f"), CASES)
def test_depth_kernel_equals_reference(
    kind: str, positions: int, batch: int, dtype: str, block_b: int | None, block_f: int | None
) -> None:
    """float32: the same tokens, greedy and sampled, and the same logits (rtol 1e-5) given
    the same codes. bfloat16: the kernel sums in another order, so a rounding may differ by
    one unit: logits given the same codes within 1/128 of their scale (one bfloat16 unit in
    the last place at that scale), and the same greedy token wherever the reference's best
    logit leads the next by more than twice that."""
    lm = _lm(kind, positions)
    w = _cast(depth_weights(lm), jnp.dtype(dtype))
    args = _frame_inputs(lm, batch, jnp.dtype(dtype))
    kw = dict(impl="pallas", interpret=RACES, block_b=block_b, block_f=block_f)
    want = reference(w, *args, greedy=True)
    _, ref_logits = reference(w, *args, greedy=True, given_bp=want)
    got, logits = depth_frame(w, *args, greedy=True, given_bp=want, **kw)  # type: ignore[misc]
    ref_logits, logits = np.asarray(ref_logits), np.asarray(logits)
    scale = np.abs(ref_logits).max()
    if dtype == "float32":
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        for greedy in (True, False):
            np.testing.assert_array_equal(
                np.asarray(depth_frame(w, *args, greedy=greedy, **kw)),
                np.asarray(reference(w, *args, greedy=greedy)),
            )
        assert len(np.unique(np.asarray(reference(w, *args, greedy=False)))) > 3
        return
    tol = scale / 128
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=tol)
    top2 = np.sort(ref_logits, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0] > 2 * tol).T  # [B, P]
    np.testing.assert_array_equal(np.asarray(got)[clear], np.asarray(want)[clear])
    assert clear.sum() >= 3


@pytest.mark.parametrize(
    ("kind", "dtype"),
    [("moshi", "float32"), ("csm", "float32"), ("moshi_per_layer", "float32"),
     ("moshi", "bfloat16"), ("csm", "bfloat16")],
)  # fmt: skip
def test_greedy_depth_reference_equals_the_model(kind: str, dtype: str) -> None:
    """The packed weights and the reference are the LM's depth transformer, rounding where
    it rounds: greedy tokens equal `LM.depth_step` + argmax, both layer layouts, float32
    and bfloat16 compute."""
    lm = _lm(kind.removesuffix("_per_layer"), 4, scan_layers=not kind.endswith("per_layer"))
    lm = _with_dtype(lm, dtype)
    h, first, seeds, temp, top_k = _frame_inputs(lm, 6, jnp.dtype(dtype))
    text = jnp.arange(6) % lm.cfg.text_card
    state, prev, out = lm.depth_init_state(6), text, []
    for k in range(lm.cfg.dep_q):
        state, logits = lm.depth_step(state, k, h, prev)
        prev = jnp.argmax(logits, -1).astype(jnp.int32)
        out.append(prev)
    tokens = reference(depth_weights(lm), h, first, seeds, temp, top_k, greedy=True)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(jnp.stack(out, 1)))


def _with_dtype(lm: LM, dtype: str) -> LM:
    """The same weights computing in `dtype`."""
    other = LM(dataclasses.replace(lm.cfg, dtype=dtype), rngs=nnx.Rngs(1))
    nnx.update(other, nnx.state(lm))
    return other


def _with_impl(lm: LM, impl: str) -> LM:
    """The same weights under another lm.attention_impl."""
    other = LM(dataclasses.replace(lm.cfg, attention_impl=impl), rngs=nnx.Rngs(1))
    nnx.update(other, nnx.state(lm))
    return other


@pytest.mark.parametrize("kind", ["moshi", "csm"])
def test_generation_through_the_kernel_equals_the_reference_generator(kind: str) -> None:
    lm = _lm(kind, 3)
    fused = _with_impl(lm, "pallas")
    user = np.random.default_rng(0).integers(0, 32, (3, 3, 5)).astype(np.int32)
    greedy = SamplingConfig(greedy=True)
    outs = []
    for model in (lm, fused):
        gen = Generator(model, greedy)
        _, tokens = gen.run(gen.init(3, jax.random.key(0)), user)
        outs.append(np.asarray(tokens))
    np.testing.assert_array_equal(outs[1], outs[0])


def test_engine_through_the_kernel_reproduces_the_reference_engine() -> None:
    """Per-session sampling through the kernel: a session at temperature 0 says what the
    reference engine's says; its neighbour samples (temperature 1, top-k 0 = the engine's)."""
    cfg = load_config(resolve_preset("tiny", "lm"))
    codec = Mimi(cfg.codec, rngs=nnx.Rngs(0))
    lm = LM(cfg.lm, rngs=nnx.Rngs(1))
    sampled = SamplingConfig(temp=1.0, top_k=20, temp_text=1.0, top_k_text=0)
    frames = []
    for model in (lm, _with_impl(lm, "pallas")):
        engine = Engine(codec, model, 2, sampled)
        greedy = engine.join(jax.random.key(0), SessionSampling(temp_text=0.0, temp=0.0))
        other = engine.join(jax.random.key(1))
        wav = gliding_tone(6 * engine.frame_size, np.random.default_rng(0)).reshape(6, -1)
        frames.append([engine.step({greedy: wav[t], other: wav[t]}) for t in range(6)])
    for ref, ker in zip(*frames, strict=True):
        np.testing.assert_array_equal(ker.text[greedy], ref.text[greedy])
        np.testing.assert_array_equal(ker.codes[greedy], ref.codes[greedy])
        np.testing.assert_allclose(ker.audio[greedy], ref.audio[greedy], rtol=0, atol=1e-6)
    codes = np.stack([f.codes[other] for f in frames[1] if f.valid[other]])
    assert codes.min() >= 0 and codes.max() < cfg.lm.card and len(np.unique(codes)) > 3


# --------------------------------------------------------------------------- grouped matmul


@pytest.mark.parametrize(
    ("groups", "rows", "n_in", "n_out", "dtype", "rtol"),
    [(3, 7, 40, 96, "float32", 1e-5), (5, 9, 33, 17, "float32", 1e-5),
     (4, 16, 128, 256, "bfloat16", 1e-2)],
)  # fmt: skip
def test_grouped_matmul_forward_and_gradients(
    groups: int, rows: int, n_in: int, n_out: int, dtype: str, rtol: float
) -> None:
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (groups, rows, n_in)).astype(dtype)
    w = jax.random.normal(keys[1], (groups, n_out, n_in)).astype(dtype)
    cotangent = jax.random.normal(keys[2], (groups, rows, n_out)).astype(dtype)

    def loss(f: object, x: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.sum((f(x, w) * cotangent).astype(jnp.float32))  # type: ignore[operator]

    kernel = lambda x, w: grouped_matmul(x, w, impl="pallas")  # noqa: E731
    ref = lambda x, w: gmm_reference(x.astype(jnp.float32), w.astype(jnp.float32))  # noqa: E731
    scale = float(jnp.abs(ref(x, w)).max())
    np.testing.assert_allclose(
        np.asarray(kernel(x, w), np.float32), np.asarray(ref(x, w)), rtol=rtol, atol=rtol * scale
    )
    grads = [jax.grad(lambda *a, f=f: loss(f, *a), (0, 1))(x, w) for f in (kernel, ref)]
    for got, want in zip(*grads, strict=True):
        top = float(jnp.abs(want).max())
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=rtol * top)


def test_kernel_per_batch_shard_on_a_mesh() -> None:
    """Under a (data 4 x tensor 2) mesh the grouped matmul runs per batch shard: the value
    and the gradients (the weights' summed over shards) equal the unsharded reference."""
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    rules = [("batch", "data"), ("steps", None), ("embed", None)]
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (3, 16, 40))
    w = jax.random.normal(keys[1], (3, 24, 40))
    cotangent = jax.random.normal(keys[2], (3, 16, 24))

    def loss(x: jax.Array, w: jax.Array) -> jax.Array:
        with activation_sharding(mesh, rules):
            kernel = functools.partial(grouped_matmul, impl="pallas")
            return jnp.sum(per_batch_shard(kernel, (x, w), (1, None), 1) * cotangent)

    def reference_loss(x: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.sum(gmm_reference(x, w) * cotangent)

    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(loss)(x, w))
        got = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
    want = jax.value_and_grad(reference_loss, (0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_training_pass_through_the_grouped_matmul() -> None:
    """The teacher-forced loss and its gradients of a moshi-kind LM are the same with the
    per-step projections as grouped matmuls."""
    lm = _lm("moshi", 3)
    fused = _with_impl(lm, "pallas")
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 32, (2, 7, 6)), jnp.int32)

    def loss(model: LM) -> jax.Array:
        out = model(tokens)
        return jnp.mean(out.audio_logits**2) + jnp.mean(out.text_logits**2)

    (l_ref, g_ref), (l_ker, g_ker) = (nnx.value_and_grad(loss)(m) for m in (lm, fused))
    np.testing.assert_allclose(float(l_ker), float(l_ref), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_ker), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("context", [None, 100])
def test_splash_attention_equals_the_reference(context: int | None) -> None:
    """The temporal attention through splash (interpreted), grouped heads, causal and
    windowed: outputs and gradients at 1e-5 of the reference (float32)."""
    b, t, h, g, d = 2, 256, 4, 2, 128
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, h, d))
    k, v = (jax.random.normal(key, (b, t, g, d)) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], (b, t, h * d))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    outs = []
    for impl in ("xla", "pallas"):

        def loss(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = impl) -> jax.Array:
            out = self_attention(q, k, v, pos, context=context, impl=impl)  # type: ignore[arg-type]
            return jnp.sum(out * cotangent), out

        outs.append(jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v))
    (g_ref, y_ref), (g_ker, y_ker) = outs
    np.testing.assert_allclose(np.asarray(y_ker), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    for a, r in zip(g_ker, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- TPU compile

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (sfm[tpu])"
)


@needs_libtpu
@pytest.mark.parametrize(
    ("chip", "kind", "batch", "dtype"),
    [("v5e", "moshi", 16, "bfloat16"), ("v5p", "csm", 32, "bfloat16"),
     ("v6e", "moshi", 8, "float32")],
)  # fmt: skip
def test_depth_kernel_compiles_with_mosaic(chip: str, kind: str, batch: int, dtype: str) -> None:
    """Moshi 7B's (K=8) and CSM's (K=32) depth shapes compile with Mosaic for a real chip,
    inside its VMEM (the compiler refuses a kernel that does not fit); float32 too (full
    precision products)."""
    spec = importlib.util.spec_from_file_location("depth_kernels", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["depth_kernels"] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    report = bench.compile_depth_frame(chip, kind, batch, dtype=jnp.dtype(dtype))
    print(report)
    assert report.vmem_bytes <= report.vmem_capacity
    assert report.flops > 0 and report.bytes_accessed > report.weight_bytes * 0.99


@needs_libtpu
def test_train_step_with_kernels_compiles_for_v5e() -> None:
    """`lm.attention_impl=pallas` in a sharded train step (data x fsdp x tensor on v5e-8):
    splash attention (forward and both backward kernels) and the grouped matmuls compile
    with Mosaic, each per batch shard."""
    over = [
        "mesh.ici_data=2", "mesh.ici_fsdp=2", "mesh.ici_tensor=2", "lm.temporal.dim=256",
        "lm.temporal.num_heads=2", "lm.temporal.context=200", "data.seq_len=256",
    ]  # fmt: skip
    reports = {
        impl: aot.compile_for_topology(
            load_config(TINY_PRETRAIN, [*over, f"lm.attention_impl={impl}"]), "v5e-8"
        )
        for impl in ("xla", "pallas")
    }
    print(reports["pallas"].table())
    assert reports["xla"].kernels == ()
    names = {entry.rsplit(" x", 1)[0] for entry in reports["pallas"].kernels}
    # megablox names its grouped matmuls "kernel"
    assert {"splash_mha_fwd_residuals", "splash_mha_dq_no_residuals",
            "splash_mha_dkv_no_residuals", "kernel"} <= names, names  # fmt: skip


def test_vmem_plan_fits_the_chip() -> None:
    """Smaller tiles, chunks and single buffers where VMEM is short; equal tiles."""
    spec = importlib.util.spec_from_file_location("depth_kernels", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["depth_kernels"] = bench
    spec.loader.exec_module(bench)
    w = bench.depth_shapes("csm")
    mib = 1 << 20
    big, small = (plan(w, 256, jnp.bfloat16, cap * mib) for cap in (128, 64))
    assert small.vmem_bytes <= 60 * mib < big.vmem_bytes <= 124 * mib
    assert (small.rows, small.chunk) < (big.rows, big.chunk) or small.single
    assert plan(w, 300, jnp.bfloat16, 128 * mib).rows in (160, 80, 48, 32, 16)  # 300 = 2 x 150
    assert vmem_bytes(w, 16, 1024, jnp.bfloat16, True) < vmem_bytes(w, 16, 1024, jnp.bfloat16)
    with pytest.raises(ValueError, match="VMEM"):
        plan(w, 16, jnp.bfloat16, 16 * mib)
