"""Serving options that the CLI offers without importing the engine."""

from __future__ import annotations

from typing import Literal

# How the engine stores the LM's weights (sfm.infer.quantize).
WeightFormat = Literal["float32", "bfloat16", "int8"]
WEIGHT_FORMATS: tuple[str, ...] = ("float32", "bfloat16", "int8")
