"""Typed configuration of a training run: task, optimizer, schedule, checkpoints, logging."""

from __future__ import annotations

import dataclasses
from typing import Literal

from sfm.codec.config import MEL_SCALES, DiscConfig


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine (or constant) decay, global-norm clipping."""

    lr: float = 3e-4
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One run. `task` picks the model and loss; the loop is shared."""

    task: Literal["pretrain", "duplex", "codec"] = "pretrain"
    steps: int = 1000
    grad_accum: int = 1  # micro-batches per step; the loss is their mean (each normalised)
    log_every: int = 10
    ckpt_every: int = 100
    keep: int = 3
    async_checkpoint: bool = True
    out_dir: str = "runs/default"
    init_from: str | None = None  # a checkpoint to start from (sfm params file or Moshi)
    # A Llama-style text LM (Hugging Face safetensors) for the temporal transformer, the text
    # embedding and the text head, as Moshi starts from Helium (sfm.io.llama).
    init_text_from: str | None = None
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank only
    lora_scaling: float = 2.0
    nan_policy: Literal["stop", "skip"] = "stop"
    optim: OptimConfig = OptimConfig()

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "log_every", "ckpt_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if self.init_from and self.init_text_from:
            raise ValueError("train.init_text_from: conflicts with train.init_from (set one)")
        if self.task == "codec" and (self.init_text_from or self.lora_rank):
            raise ValueError("train.init_text_from, train.lora_rank: LM settings, not the codec's")


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (Mimi itself trained with mel = 0)."""

    adv: float = 1.0
    feat: float = 2.0
    mel: float = 15.0
    commit: float = 1.0
    distill: float = 1.0
    disc: float = 1.0


@dataclasses.dataclass(frozen=True)
class CodecTrainConfig:
    """Codec training: corpora, crop length, loss weights, discriminators, teacher.

    `corpus` entries are corpus directories (manifest.jsonl + 24 kHz WAVs), manifest files,
    prepared tfds directories (their `split` is read), or plain folders of audio files (every
    .wav, .flac and .ogg under them)."""

    corpus: tuple[str, ...] = ()
    split: str = "train"
    segment_seconds: float = 2.0
    weights: LossWeights = LossWeights()
    mel_scales: tuple[tuple[int, int], ...] = MEL_SCALES
    disc: DiscConfig = DiscConfig()
    teacher: Literal["none", "mel"] = "none"
    teacher_dim: int = 64

    def __post_init__(self) -> None:
        if self.segment_seconds <= 0:
            raise ValueError("codec_train.segment_seconds: must be > 0")
