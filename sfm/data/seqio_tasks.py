"""seqio Tasks and a Mixture over the grain pipeline's ArrayRecord shards (the `seqio` extra).

Each source (text, speech, interleaved, duplex) becomes a Task whose FunctionDataSource
yields this host's raw records ({"record": bytes}, one epoch, shuffled by seed). A seeded
preprocessor decodes, lays out, delays and windows every record with the same numpy
functions as sfm.data.pipeline (through tf.numpy_function) and drops bad records, so
examples are {"tokens": int32 [S, seq_len], "mask": bool [S, seq_len], "source": int32}.
The Mixture samples the Tasks with the DataConfig's weights. seqio and TensorFlow are
imported only when tasks are registered.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sfm.data import pipeline as pl
from sfm.data.config import DataConfig
from sfm.errors import SfmError
from sfm.lm.layout import StreamLayout

SPLITS = ("train",)
SHUFFLE_BUFFER = 256


class SeqioUnavailableError(SfmError, ImportError):
    """seqio (and TensorFlow) are not installed."""


def _seqio() -> tuple[Any, Any]:
    """The seqio and tensorflow modules, or a one-line error naming the extra."""
    try:
        import seqio
        import tensorflow as tf
    except ImportError as err:
        msg = f"seqio tasks need the seqio extra: pip install 'sfm[seqio]' ({err})"
        raise SeqioUnavailableError(msg) from None
    return seqio, tf


def task_name(prefix: str, source: str) -> str:
    """The registered name of one source's Task."""
    return f"{prefix}_{source}"


def mixture_name(prefix: str) -> str:
    """The registered name of the Mixture."""
    return f"{prefix}_mixture"


def output_features(seqio: Any, tf: Any) -> dict[str, Any]:
    """Features of every example: tokens and mask [S, seq_len], source id."""
    vocab = seqio.PassThroughVocabulary(size=0)
    return {
        "tokens": seqio.Feature(vocab, add_eos=False, dtype=tf.int32, rank=2),
        "mask": seqio.Feature(vocab, add_eos=False, dtype=tf.bool, rank=2),
        "source": seqio.Feature(vocab, add_eos=False, dtype=tf.int32, rank=0),
    }


def records_fn(cfg: DataConfig, source: str, tf: Any) -> Any:
    """dataset_fn(split, shuffle_files, seed) of a source: its raw records on this host."""
    records = pl.sharded_records(cfg.paths(source), pl.host_shard(cfg))
    signature = {"record": tf.TensorSpec((), tf.string)}

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> Any:
        shuffle_seed = cfg.seed if seed is None else int(seed)
        ordered = records.shuffle(seed=shuffle_seed) if shuffle_files else records
        return tf.data.Dataset.from_generator(
            lambda: ({"record": ordered[i]} for i in range(len(ordered))),
            output_signature=signature,
        )

    return dataset_fn


def numpy_element(
    cfg: DataConfig, layout: StreamLayout, source: str, data: bytes, seed: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.bool_]:
    """(tokens, mask, ok) of one record, windowed with an rng seeded by `seed`."""
    decode, window = pl.source_fns(cfg, layout, source)
    item = decode(bytes(data))
    element = window(item, np.random.default_rng(np.asarray(seed).astype(np.uint32)))
    if element is None:
        shape = (layout.n_streams, cfg.seq_len)
        return np.full(shape, -1, np.int32), np.zeros(shape, bool), np.bool_(False)
    return element["tokens"], element["mask"], np.bool_(True)


def layout_preprocessor(
    cfg: DataConfig, layout: StreamLayout, source: str, seqio: Any, tf: Any
) -> Any:
    """A seeded seqio preprocessor: record -> windowed streams; bad records dropped."""
    shape, k = (layout.n_streams, cfg.seq_len), pl.SOURCES.index(source)

    @seqio.map_over_dataset(num_seeds=1)
    def to_streams(ex: dict[str, Any], seed: Any) -> dict[str, Any]:
        out = tf.numpy_function(
            lambda data, s: numpy_element(cfg, layout, source, data, s),
            [ex["record"], seed],
            [tf.int32, tf.bool, tf.bool],
            stateful=False,
        )
        tokens, mask, ok = (tf.ensure_shape(t, s) for t, s in zip(out, (shape, shape, ())))
        return {"tokens": tokens, "mask": mask, "source": tf.constant(k, tf.int32), "ok": ok}

    def preprocess(dataset: Any) -> Any:
        kept = to_streams(dataset).filter(lambda ex: ex["ok"])
        return kept.map(lambda ex: {key: v for key, v in ex.items() if key != "ok"})

    return preprocess


def _replace(registry: Any, name: str) -> None:
    """Forget an earlier registration of `name`, so registering is idempotent."""
    if name in registry.names():
        registry.remove(name)


def register_tasks(cfg: DataConfig, layout: StreamLayout, prefix: str = "sfm") -> list[str]:
    """Register a Task per source with shards and weight (records read in `layout`), then
    their Mixture; returns the names."""
    seqio, tf = _seqio()
    features, names, rates = output_features(seqio, tf), [], []
    for source, weight in zip(pl.SOURCES, cfg.weights):
        if weight <= 0 or not cfg.paths(source):
            continue
        name = task_name(prefix, source)
        _replace(seqio.TaskRegistry, name)
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(records_fn(cfg, source, tf), splits=SPLITS),
            preprocessors=[layout_preprocessor(cfg, layout, source, seqio, tf)],
            output_features=features,
            shuffle_buffer_size=SHUFFLE_BUFFER,
        )
        names.append(name)
        rates.append((name, float(weight)))
    if not names:
        raise pl.DataError(
            "data: no source has both shard files (data.*_paths) and a positive data.weights entry"
        )
    _replace(seqio.MixtureRegistry, mixture_name(prefix))
    seqio.MixtureRegistry.add(mixture_name(prefix), rates)
    return [*names, mixture_name(prefix)]
