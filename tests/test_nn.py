"""Every streaming layer: stepping through chunks equals the offline call."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfm.nn import (
    LayerNorm,
    MultiHeadAttention,
    RMSNorm,
    StreamingConv1d,
    StreamingConvTranspose1d,
    Transformer,
    apply_rope,
    gated_mlp,
    reset_where,
)


def _stream(module, state, x, chunks):
    outs, start = [], 0
    for size in chunks:
        state, y = module.step(state, x[:, start : start + size])
        outs.append(y)
        start += size
    return state, jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize(
    "kernel,stride,dilation,groups,pad_mode",
    [
        (7, 1, 1, 1, "constant"),
        (3, 1, 2, 1, "constant"),
        (8, 4, 1, 1, "constant"),
        (4, 2, 1, 1, "replicate"),
        (4, 2, 1, 6, "constant"),
        (1, 1, 1, 1, "constant"),
    ],
)
def test_conv1d_streaming_equals_offline(kernel, stride, dilation, groups, pad_mode):
    conv = StreamingConv1d(
        6,
        12,
        kernel,
        stride=stride,
        dilation=dilation,
        groups=groups,
        pad_mode=pad_mode,
        rngs=nnx.Rngs(0),
    )
    x = jax.random.normal(jax.random.key(1), (3, 24 * stride, 6))
    offline = conv(x)
    assert offline.shape == (3, 24, 12)
    _, streamed = _stream(
        conv, conv.init_state(3), x, [stride, 5 * stride, 2 * stride, 16 * stride]
    )
    np.testing.assert_allclose(streamed, offline, atol=1e-6)


def test_conv1d_matches_reference_convolution():
    """Causal zero-padded conv against an explicit numpy loop."""
    conv = StreamingConv1d(2, 3, 4, stride=2, rngs=nnx.Rngs(0))
    x = np.asarray(jax.random.normal(jax.random.key(2), (1, 10, 2)))
    w, b = np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])
    xp = np.concatenate([np.zeros((1, 2, 2), np.float32), x], axis=1)
    ref = np.stack([np.einsum("kc,kco->o", xp[0, 2 * t : 2 * t + 4], w) + b for t in range(5)])
    np.testing.assert_allclose(conv(jnp.asarray(x))[0], ref, atol=1e-5)


def test_replicate_padding_uses_first_sample():
    conv = StreamingConv1d(
        1, 1, 4, stride=2, use_bias=False, pad_mode="replicate", rngs=nnx.Rngs(0)
    )
    x = jnp.full((1, 4, 1), 3.0)
    w = float(conv.kernel[...].sum())
    np.testing.assert_allclose(conv(x)[0, :, 0], [3.0 * w, 3.0 * w], rtol=1e-6)


@pytest.mark.parametrize(
    "kernel,stride,groups", [(8, 4, 1), (4, 2, 6), (3, 1, 1), (5, 2, 2), (2, 2, 1)]
)
def test_conv_transpose_streaming_equals_offline(kernel, stride, groups):
    convtr = StreamingConvTranspose1d(6, 6, kernel, stride=stride, groups=groups, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 20, 6))
    offline = convtr(x)
    assert offline.shape == (2, 20 * stride, 6)
    _, streamed = _stream(convtr, convtr.init_state(2), x, [1, 7, 2, 10])
    np.testing.assert_allclose(streamed, offline, atol=1e-5)


def test_conv_transpose_matches_scatter_reference():
    convtr = StreamingConvTranspose1d(2, 3, 5, stride=2, rngs=nnx.Rngs(0))
    x = np.asarray(jax.random.normal(jax.random.key(3), (1, 6, 2)))
    w, b = np.asarray(convtr.kernel[...]), np.asarray(convtr.bias[...])
    full = np.zeros((6 * 2 + 3, 3), np.float32)
    for t in range(6):
        full[2 * t : 2 * t + 5] += np.einsum("c,koc->ko", x[0, t], w)
    np.testing.assert_allclose(convtr(jnp.asarray(x))[0], full[:12] + b, atol=1e-5)


def test_norms():
    x = jax.random.normal(jax.random.key(0), (2, 5, 16)) * 3 + 1
    y = LayerNorm(16)(x)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(-1), 1, atol=1e-3)
    r = RMSNorm(16)(x)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(r**2, -1)), 1, atol=1e-4)


def test_rope_is_relative():
    """Rotated q.k depends only on the position difference."""
    q = jax.random.normal(jax.random.key(0), (1, 1, 2, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 2, 8))
    dots = []
    for p in (0, 5, 40):
        qr, _ = apply_rope(q, k, jnp.array([[p + 3]]), 10000.0)
        _, kr = apply_rope(q, k, jnp.array([[p]]), 10000.0)
        dots.append(jnp.sum(qr * kr))
    np.testing.assert_allclose(dots, dots[0], rtol=1e-5)


@pytest.mark.parametrize("context,capacity", [(6, 6), (6, 8), (None, 40), (250, 250), (250, 252)])
def test_attention_ring_cache_equals_offline(context, capacity):
    attn = MultiHeadAttention(16, 2, context=context, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 30, 16))
    pos = jnp.broadcast_to(jnp.arange(30), (2, 30))
    offline = attn(x, pos)
    state, outs, start = attn.init_state(2, capacity), [], 0
    for size in (1, 3, 8, 1, 17):  # chunks longer than the context too
        state, y = attn.step(state, x[:, start : start + size], pos[:, start : start + size])
        outs.append(y)
        start += size
    np.testing.assert_allclose(jnp.concatenate(outs, 1), offline, atol=1e-5)


def test_transformer_streaming_and_reset():
    tr = Transformer(
        2,
        16,
        context=5,
        num_heads=2,
        dim_feedforward=32,
        max_period=10000.0,
        layer_scale=0.1,
        gating=True,
        norm="rms_norm",
        rngs=nnx.Rngs(0),
    )
    x = jax.random.normal(jax.random.key(1), (2, 12, 16))
    offline = tr(x)
    state, streamed = _stream(tr, tr.init_state(2), x, [2, 2, 8])
    np.testing.assert_allclose(streamed, offline, atol=1e-5)
    # Reset item 1 only: it restarts from position 0, item 0 continues.
    state = reset_where(state, tr.init_state(2), jnp.array([False, True]))
    x2 = jax.random.normal(jax.random.key(2), (2, 4, 16))
    _, y = tr.step(state, x2)
    np.testing.assert_allclose(y[1], tr(x2[1:2])[0], atol=1e-5)
    cont = tr(jnp.concatenate([x[:1], x2[:1]], axis=1))[0, 12:]
    np.testing.assert_allclose(y[0], cont, atol=1e-5)


def test_gated_mlp_shape():
    mlp = gated_mlp(8, 12, rngs=nnx.Rngs(0))
    assert mlp(jnp.ones((1, 3, 8))).shape == (1, 3, 8)
    assert mlp.linear_in.kernel.shape == (24, 8)  # stored [out, in]
