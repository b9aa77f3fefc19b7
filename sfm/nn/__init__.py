"""Layers shared by the codec and the LM, each streaming module with `init_state` / `step`."""

from sfm.nn.attention import MultiHeadAttention
from sfm.nn.conv import StreamingConv1d, StreamingConvTranspose1d
from sfm.nn.linear import LayerScale, Linear
from sfm.nn.mlp import GatedMlp, Mlp, gated_mlp
from sfm.nn.norm import LayerNorm, RMSNorm
from sfm.nn.rope import apply_rope
from sfm.nn.streaming import reset_where
from sfm.nn.transformer import Transformer, TransformerLayer

__all__ = [
    "GatedMlp",
    "LayerNorm",
    "LayerScale",
    "Linear",
    "Mlp",
    "MultiHeadAttention",
    "RMSNorm",
    "StreamingConv1d",
    "StreamingConvTranspose1d",
    "Transformer",
    "TransformerLayer",
    "apply_rope",
    "gated_mlp",
    "reset_where",
]
