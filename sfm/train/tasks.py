"""Training tasks: what a run trains and on what. The loop in sfm.train.loop is shared.

A task builds the model, names which state the optimizer trains and which the loss updates
(EMA statistics), gives the loss, the per-host data iterator and the analytic cost of a
step, and exports the trained weights. `train.task` picks one: "pretrain" and "duplex"
train the LM (they differ only in data mixture and starting point), "codec" the codec.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx

from sfm.config import Config, dump_yaml
from sfm.data.config import DataConfig
from sfm.train.step import LossFn


class Task(Protocol):
    """The task-specific half of a training run."""

    def build_model(self, cfg: Config) -> nnx.Module: ...
    def trainable(self, cfg: Config) -> Any: ...
    def mutable(self, cfg: Config) -> Any: ...
    def loss_fn(self, cfg: Config) -> LossFn: ...
    def dataset(self, cfg: Config) -> Any: ...
    def device_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
    def batch_shapes(self, cfg: Config) -> dict[str, jax.ShapeDtypeStruct]: ...
    def cost(self, cfg: Config) -> tuple[int, float]: ...  # per step of the global batch
    def export(self, cfg: Config, model: nnx.Module, out_dir: Path) -> Path: ...


class LMTask:
    """Interleaved pretraining or duplex fine-tuning of the speech-text LM."""

    def build_model(self, cfg: Config) -> nnx.Module:
        """A fresh LM, its weights from `train.init_from` (or its temporal transformer from
        the text LM `train.init_text_from`) when given, LoRA when asked."""
        from sfm.lm.model import LM

        model = LM(cfg.lm, rngs=nnx.Rngs(cfg.seed))
        if cfg.train.init_from:
            from sfm.io.weights import load_weights

            load_weights(model, cfg.train.init_from)
        if cfg.train.init_text_from:
            from sfm.io.llama import load_text_lm

            load_text_lm(model, cfg.train.init_text_from)
        if cfg.train.lora_rank > 0:
            from sfm.lm.lora import apply_lora

            apply_lora(model, cfg.train.lora_rank, cfg.train.lora_scaling)
        return model

    def trainable(self, cfg: Config) -> Any:
        """The LoRA adapters, or every parameter."""
        if cfg.train.lora_rank > 0:
            from sfm.lm.lora import LoRAParam

            return LoRAParam
        return nnx.Param

    def mutable(self, cfg: Config) -> Any:
        return nnx.Nothing

    def loss_fn(self, cfg: Config) -> LossFn:
        from sfm.lm.loss import lm_loss_fn

        return lm_loss_fn

    def dataset(self, cfg: Config) -> Any:
        from sfm.data.pipeline import build_dataset

        return build_dataset(lm_data_config(cfg), cfg.lm.layout)

    def device_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"tokens": host_batch["tokens"], "mask": host_batch["mask"]}

    def batch_shapes(self, cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch the step takes: tokens int32 / mask bool [batch, streams, seq]."""
        shape = (cfg.data.batch_size, cfg.lm.n_streams, cfg.data.seq_len)
        return {
            "tokens": jax.ShapeDtypeStruct(shape, np.int32),
            "mask": jax.ShapeDtypeStruct(shape, np.bool_),
        }

    def cost(self, cfg: Config) -> tuple[int, float]:
        """(frames per step, training FLOPs per step)."""
        from sfm.train.metrics import lm_train_flops_per_frame

        frames = cfg.data.batch_size * cfg.data.seq_len
        return frames, frames * lm_train_flops_per_frame(cfg.lm, cfg.data.seq_len)

    def export(self, cfg: Config, model: nnx.Module, out_dir: Path) -> Path:
        """`out_dir/lm.safetensors`: the weights (LoRA merged) and the run's config."""
        from sfm.io.params import save_params
        from sfm.lm.lora import merge_lora

        if cfg.train.lora_rank > 0:
            merge_lora(model)
        path = out_dir / "lm.safetensors"
        if jax.process_index() == 0:
            save_params(model, path, dump_yaml(cfg))
        return path


def lm_data_config(cfg: Config) -> DataConfig:
    """The run's data settings, seeded by the run's seed unless `data.seed` is set."""
    return dataclasses.replace(cfg.data, seed=cfg.data.seed or cfg.seed)


def get_task(cfg: Config) -> Task:
    """The task `train.task` names."""
    if cfg.train.task == "codec":
        from sfm.train.codec_task import CodecTask

        return CodecTask()
    return LMTask()
