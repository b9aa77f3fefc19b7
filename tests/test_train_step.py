"""The jitted train step: gradient accumulation, bf16 compute with f32 masters, NaN policy,
LoRA-only updates, duplex from an exported checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfm.config import load_config
from sfm.lm.loss import lm_loss_fn
from sfm.train.config import TrainConfig
from sfm.train.errors import TrainingStopped
from sfm.train.loop import _check_finite
from sfm.train.step import build_train_step, make_optimizer, split_model
from sfm.train.tasks import LMTask

ROOT = Path(__file__).resolve().parents[1]
CFG = load_config(ROOT / "configs" / "train" / "tiny_pretrain.yaml", ["train.grad_accum=1"])
MESH = jax.make_mesh(
    (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
)


def _batch(seed: int = 0, b: int = 8, t: int = 16) -> dict[str, jax.Array]:
    """Random tokens; every row has the same loss-weight total (no text pads, one mask
    pattern), so micro-batch losses average to the full-batch loss exactly."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 64, size=(b, CFG.lm.n_streams, t)).astype(np.int32)
    mask = np.zeros(tokens.shape, bool)
    mask[:, : 1 + CFG.lm.dep_q] = rng.random((1, 1 + CFG.lm.dep_q, t)) < 0.9
    return {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}


def _step(train: TrainConfig, cfg=CFG, trainable=nnx.Param, model=None):  # noqa: ANN001, ANN202
    model = model or LMTask().build_model(cfg)
    tx = make_optimizer(train.optim, train.steps)
    parts = split_model(model, trainable, tx, MESH, cfg.mesh.rules)
    return parts, build_train_step(parts, lm_loss_fn, train)


def _run(parts, step, batch, n: int = 1):  # noqa: ANN001, ANN202
    params, mutable, opt = parts.params, parts.mutable, parts.opt_state
    for i in range(n):
        params, mutable, opt, metrics = step(
            params, mutable, parts.frozen, opt, batch, jax.random.key(i)
        )
    return params, metrics


def test_grad_accumulation_equals_one_big_batch() -> None:
    batch = _batch()
    one = _run(*_step(dataclasses.replace(CFG.train, grad_accum=1)), batch, n=2)
    four = _run(*_step(dataclasses.replace(CFG.train, grad_accum=4)), batch, n=2)
    assert float(one[1]["loss"]) == pytest.approx(float(four[1]["loss"]), abs=1e-5)
    for a, b in zip(jax.tree.leaves(one[0]), jax.tree.leaves(four[0]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_bf16_compute_keeps_f32_masters() -> None:
    bf16 = dataclasses.replace(CFG, lm=dataclasses.replace(CFG.lm, dtype="bfloat16"))
    params32, m32 = _run(*_step(CFG.train), _batch())
    params16, m16 = _run(*_step(CFG.train, cfg=bf16), _batch())
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))
    assert np.isfinite(float(m16["loss"]))
    assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=2e-2)
    assert float(m16["loss"]) != float(m32["loss"])  # the compute really ran in bf16


def test_nan_policy_skip_keeps_the_old_state_and_stop_names_the_step() -> None:
    skip = dataclasses.replace(CFG.train, nan_policy="skip")
    parts, _ = _step(skip)
    before = jax.tree.map(np.asarray, parts.params)

    def nan_loss(model, batch, rng):  # noqa: ANN001, ANN202
        loss, metrics = lm_loss_fn(model, batch, rng)
        return loss * jnp.nan, metrics

    step = build_train_step(parts, nan_loss, skip)
    params, _, _, metrics = step(
        parts.params, parts.mutable, parts.frozen, parts.opt_state, _batch(), jax.random.key(0)
    )
    assert not bool(metrics["finite"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    values = {"finite": 0.0, "loss": float("nan"), "grad_norm": float("nan")}
    with pytest.raises(TrainingStopped, match="step 7"):
        _check_finite(values, 6, CFG)


def test_lora_step_updates_only_the_adapters() -> None:
    from sfm.lm.lora import LoRAParam

    lora = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, lora_rank=4))
    model = LMTask().build_model(lora)
    base = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(LoRAParam)))
    parts, step = _step(lora.train, cfg=lora, trainable=LoRAParam, model=model)
    params, metrics = _run(parts, step, _batch(), n=3)
    assert np.isfinite(float(metrics["loss"]))
    assert any(np.abs(np.asarray(x)).sum() > 0 for x in jax.tree.leaves(params))
    frozen = jax.tree.map(np.asarray, parts.frozen)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(a, b)
