"""Split residual vector quantizer with EMA codebooks (Mimi: 1 semantic + N acoustic).

Codebooks are not trained by gradient: each stores an EMA of the summed vectors assigned to
every entry (`embedding_sum`) and of its usage count (`cluster_usage`); the centroid is their
ratio. Entries whose usage falls below a threshold are replaced by vectors of the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sfm.codec.config import QuantizerConfig
from sfm.nn.init import logical, normal
from sfm.nn.linear import Linear


class CodebookStat(nnx.Variable):
    """A codebook statistic: updated by EMA in training, never by the optimizer."""


class FrozenCentroids(nnx.Variable):
    """Centroids and their squared norms precomputed for inference (see `freeze`)."""


@dataclasses.dataclass
class QuantizeResult:
    """Quantized latents [B, T, D], codes [B, K, T], commitment loss and metrics."""

    quantized: jax.Array
    codes_bkt: jax.Array
    commit_loss: jax.Array
    metrics: dict[str, jax.Array]


class EuclideanCodebook(nnx.Module):
    """Nearest-centroid lookup over `bins` entries of size `dim`."""

    def __init__(self, cfg: QuantizerConfig, *, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        shape = (cfg.bins, cfg.dimension)
        self.embedding_sum = CodebookStat(
            normal(rngs, shape), **logical(("codebook_entries", "codebook_dim"))
        )
        self.cluster_usage = CodebookStat(jnp.ones((cfg.bins,)), **logical(("codebook_entries",)))
        self.initialized = CodebookStat(jnp.zeros((1,)), **logical((None,)))

    centroids: FrozenCentroids | None = None
    sq_norms: FrozenCentroids | None = None

    @property
    def embedding(self) -> jax.Array:
        if self.centroids is not None:
            return self.centroids[...]
        usage = jnp.maximum(self.cluster_usage[...], self.cfg.epsilon)
        return self.embedding_sum[...] / usage[:, None]

    def freeze(self) -> None:
        """Store the centroids and their squared norms so that inference steps do not
        recompute them from the EMA statistics on every call. Only for a model that is no
        longer trained: use it on a copy made for serving (`nnx.merge(*nnx.split(model))`)."""
        emb = self.embedding.astype(jnp.float32)
        self.centroids = FrozenCentroids(emb)
        self.sq_norms = FrozenCentroids(jnp.sum(emb * emb, -1))

    def encode(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [...] int32 codes of the nearest centroid (squared L2)."""
        if self.centroids is not None and self.sq_norms is not None:
            emb, emb_sq = self.centroids[...], self.sq_norms[...]
        else:
            emb = self.embedding.astype(jnp.float32)
            emb_sq = jnp.sum(emb * emb, -1)
        x = x.astype(jnp.float32)
        dist = (
            jnp.sum(x * x, -1, keepdims=True)
            + emb_sq
            - 2.0 * jnp.einsum("...d,kd->...k", x, emb, precision=jax.lax.Precision.HIGHEST)
        )
        return jnp.argmin(dist, axis=-1).astype(jnp.int32)

    def decode(self, codes: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, codes, axis=0)

    def update_ema(self, x_nd: jax.Array, codes_n: jax.Array, key: jax.Array) -> jax.Array:
        """EMA step on vectors and their codes; returns the fraction of codes replaced."""
        cfg = self.cfg
        x_nd = jax.lax.stop_gradient(x_nd.astype(jnp.float32))
        first = self.initialized[...][0] == 0
        k_init, k_dead = jax.random.split(key)
        # An untrained codebook starts from random vectors of the batch.
        seeds = x_nd[jax.random.randint(k_init, (cfg.bins,), 0, x_nd.shape[0])]
        emb_sum = jnp.where(first, seeds, self.embedding_sum[...])
        usage = jnp.where(first, jnp.ones_like(self.cluster_usage[...]), self.cluster_usage[...])
        onehot = jax.nn.one_hot(codes_n, cfg.bins, dtype=jnp.float32)
        usage = cfg.decay * usage + (1 - cfg.decay) * onehot.sum(0)
        emb_sum = cfg.decay * emb_sum + (1 - cfg.decay) * (onehot.T @ x_nd)
        threshold = cfg.threshold_usage_ratio * usage.sum() / cfg.bins
        expired = usage < threshold
        replacement = x_nd[jax.random.randint(k_dead, (cfg.bins,), 0, x_nd.shape[0])]
        replaced_usage = cfg.replaced_usage_ratio * usage.sum() / cfg.bins
        self.embedding_sum[...] = jnp.where(expired[:, None], replaced_usage * replacement, emb_sum)
        self.cluster_usage[...] = jnp.where(expired, replaced_usage, usage)
        self.initialized[...] = jnp.ones((1,))
        return expired.mean()


class ResidualVQ(nnx.Module):
    """Projection in -> residual quantization over `n_q` codebooks -> projection out."""

    def __init__(self, n_q: int, input_dim: int, cfg: QuantizerConfig, *, rngs: nnx.Rngs) -> None:
        self.input_proj = Linear(
            input_dim, cfg.dimension, axes=("embed", "codebook_dim"), rngs=rngs
        )
        self.output_proj = Linear(
            cfg.dimension, input_dim, axes=("codebook_dim", "embed"), rngs=rngs
        )
        self.layers = nnx.List([EuclideanCodebook(cfg, rngs=rngs) for _ in range(n_q)])

    def encode(self, x_btd: jax.Array, n_q: int) -> jax.Array:
        residual = self.input_proj(x_btd)
        codes = []
        for layer in self.layers[:n_q]:
            c = layer.encode(residual)
            residual = residual - layer.decode(c)
            codes.append(c)
        return jnp.stack(codes, axis=1)  # [B, K, T]

    def decode(self, codes_bkt: jax.Array) -> jax.Array:
        quantized = sum(
            layer.decode(codes_bkt[:, i])
            for i, layer in enumerate(self.layers[: codes_bkt.shape[1]])
        )
        return self.output_proj(quantized)

    def train_forward(self, x_btd: jax.Array, n_q: jax.Array, key: jax.Array) -> QuantizeResult:
        """Quantize with EMA updates; codebooks beyond the (traced) `n_q` are dropped out."""
        x = self.input_proj(x_btd)
        residual, quantized = x, jnp.zeros_like(x)
        codes, losses, expired = [], [], []
        for i, layer in enumerate(self.layers):
            c = layer.encode(residual)
            q = layer.decode(c)
            keep = (i < n_q).astype(x.dtype)
            losses.append(keep * jnp.mean(jnp.square(residual - jax.lax.stop_gradient(q))))
            expired.append(
                layer.update_ema(
                    residual.reshape(-1, x.shape[-1]), c.reshape(-1), jax.random.fold_in(key, i)
                )
            )
            residual = residual - keep * jax.lax.stop_gradient(q)
            quantized = quantized + keep * jax.lax.stop_gradient(q)
            codes.append(c)
        quantized = x + jax.lax.stop_gradient(quantized - x)  # straight-through estimator
        loss = sum(losses) / jnp.maximum(n_q, 1)
        metrics = {"rvq_expired": jnp.mean(jnp.stack(expired))}
        return QuantizeResult(self.output_proj(quantized), jnp.stack(codes, 1), loss, metrics)


class SplitResidualVQ(nnx.Module):
    """`rvq_first` (semantic) and `rvq_rest` (acoustic) quantize the same input; outputs add."""

    def __init__(self, input_dim: int, cfg: QuantizerConfig, *, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        self.rvq_first = ResidualVQ(cfg.n_q_semantic, input_dim, cfg, rngs=rngs)
        self.rvq_rest = ResidualVQ(
            cfg.total_codebooks - cfg.n_q_semantic, input_dim, cfg, rngs=rngs
        )

    def encode(self, x_btd: jax.Array, n_q: int) -> jax.Array:
        ns = self.cfg.n_q_semantic
        codes = self.rvq_first.encode(x_btd, ns)
        if n_q > ns:
            codes = jnp.concatenate([codes, self.rvq_rest.encode(x_btd, n_q - ns)], axis=1)
        return codes

    def decode(self, codes_bkt: jax.Array) -> jax.Array:
        ns = self.cfg.n_q_semantic
        out = self.rvq_first.decode(codes_bkt[:, :ns])
        if codes_bkt.shape[1] > ns:
            out = out + self.rvq_rest.decode(codes_bkt[:, ns:])
        return out

    def train_forward(self, x_btd: jax.Array, n_q: int, key: jax.Array) -> QuantizeResult:
        """Training pass; with `q_dropout` the number of acoustic codebooks is drawn per batch."""
        ns, k_first, k_rest, k_drop = self.cfg.n_q_semantic, *jax.random.split(key, 3)
        n_rest = jnp.asarray(n_q - ns)
        if self.cfg.q_dropout:
            n_rest = jax.random.randint(k_drop, (), 1, n_q - ns + 1)
        first = self.rvq_first.train_forward(x_btd, jnp.asarray(ns), k_first)
        rest = self.rvq_rest.train_forward(x_btd, n_rest, k_rest)
        n_total = ns + n_rest
        loss = (first.commit_loss * ns + rest.commit_loss * n_rest) / n_total
        codes = jnp.concatenate([first.codes_bkt, rest.codes_bkt], axis=1)[:, :n_q]
        metrics = {"rvq_expired": (first.metrics["rvq_expired"] + rest.metrics["rvq_expired"]) / 2}
        return QuantizeResult(first.quantized + rest.quantized, codes, loss, metrics)
