"""Weighted cross-entropy of linear output heads, without keeping their logits for backward.

`head_cross_entropy` takes K heads step-major, logits[k] = x[k] @ kernel[k].T, and returns
sum(weights * ce). Its forward pass runs the heads one after the other and computes, while
each head's [N, vocab] logits are at hand, the gradients with respect to x and the kernel:
the loss is linear in ce, so the backward pass only scales them by the incoming cotangent.
Each head's [N, vocab] logits are dropped once its gradients are out, where plain
autodiff keeps every head's logits and softmax until the backward pass; the FLOPs equal a
plain forward + backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sfm.parallel.rules import constrain

Arrays = tuple[jax.Array, ...]
# One head's logits [rows, vocab]: rows batch-sharded, vocab as the kernels (on a mesh).
LOGIT_AXES = ("batch", "vocab")


class HeadCE(NamedTuple):
    """loss = sum(weights * ce); ce and correct (argmax == target) are [K, N] metrics that
    carry no gradient."""

    loss: jax.Array
    ce_kn: jax.Array
    correct_kn: jax.Array


def head_cross_entropy(
    x_kni: jax.Array, kernel_kvi: jax.Array, targets_kn: jax.Array, weights_kn: jax.Array
) -> HeadCE:
    """Cross-entropy of heads x [K, N, in] @ kernel [K, vocab, in].T against targets [K, N].

    Logits and softmax are float32; the products run in x's dtype (cast the kernel to it).
    Targets outside [0, vocab) (the -1 / -2 fillers) are read as the nearest valid id for ce
    (as `sfm.lm.loss.cross_entropy` does) and never count as correct: give them weight 0.
    """
    if x_kni.ndim != 3 or kernel_kvi.ndim != 3 or x_kni.shape[0] != kernel_kvi.shape[0]:
        raise ValueError(f"heads x {x_kni.shape} and kernels {kernel_kvi.shape}: want [K, N, in]")
    loss, ce, correct = _head_ce(x_kni, kernel_kvi, targets_kn, weights_kn.astype(jnp.float32))
    return HeadCE(loss, jax.lax.stop_gradient(ce), correct)


def _one_head(
    x_ni: jax.Array, kernel_vi: jax.Array, targets_n: jax.Array, weights_n: jax.Array
) -> Arrays:
    """(ce [N], correct [N], dloss/dlogits [N, vocab]) of one head."""
    logits = jnp.einsum("ni,vi->nv", x_ni, kernel_vi, preferred_element_type=jnp.float32)
    logits = constrain(logits, LOGIT_AXES)
    vocab = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    exp = jnp.exp(logits - top)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    target = jnp.arange(vocab)[None, :] == jnp.clip(targets_n, 0, vocab - 1)[:, None]
    picked = jnp.sum(jnp.where(target, logits, 0.0), axis=-1)
    ce = (top + jnp.log(total))[:, 0] - picked
    correct = jnp.argmax(logits, axis=-1) == targets_n
    dlogits = weights_n[:, None] * (exp / total - target)
    return ce, correct, dlogits


def _each_head(fn: Callable[[Arrays], Arrays], args: Arrays) -> Arrays:
    """fn over the leading (head) axis of args, one head after the other, stacked.

    A Python loop rather than a scan: static slices, and no loop around the collectives that
    the heads need on a mesh (their logits are batch- and vocab-sharded)."""
    outs = [fn(tuple(a[k] for a in args)) for k in range(args[0].shape[0])]
    return tuple(jnp.stack(ys) for ys in zip(*outs))


@jax.custom_vjp
def _head_ce(x: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array) -> Arrays:
    """(loss, ce, correct) of the heads; without differentiation XLA drops the gradients."""
    return _fwd(x, kernel, targets, weights)[0]


def _fwd(
    x: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[Arrays, Arrays]:
    """(loss, ce, correct) and, as residuals, d loss / d x and d loss / d kernel."""

    def head(args: Arrays) -> Arrays:
        x_ni, kernel_vi, targets_n, weights_n = args
        ce, correct, dlogits = _one_head(x_ni, kernel_vi, targets_n, weights_n)
        g = dlogits.astype(x_ni.dtype)
        dx = jnp.einsum("nv,vi->ni", g, kernel_vi, preferred_element_type=jnp.float32)
        dkernel = jnp.einsum("nv,ni->vi", g, x_ni, preferred_element_type=jnp.float32)
        return ce, correct, dx.astype(x_ni.dtype), dkernel.astype(kernel_vi.dtype)

    ce, correct, dx, dkernel = _each_head(head, (x, kernel, targets, weights))
    return (jnp.sum(weights * ce), ce, correct), (dx, dkernel, ce, targets)


def _bwd(residuals: Arrays, cotangents: Arrays) -> Arrays:
    """Scale the forward's gradients by the loss cotangent (ce and correct have none)."""
    dx, dkernel, ce, targets = residuals
    g = cotangents[0]
    no_grad = np.zeros(targets.shape, jax.dtypes.float0)
    return (g * dx).astype(dx.dtype), (g * dkernel).astype(dkernel.dtype), no_grad, g * ce


_head_ce.defvjp(_fwd, _bwd)

__all__ = ["HeadCE", "head_cross_entropy"]
