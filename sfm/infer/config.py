"""Serving options: the engine's weight formats and the server's limits (`serve:` section)."""

from __future__ import annotations

import dataclasses
from typing import Literal

# How the engine stores the LM's weights (sfm.infer.quantize).
WeightFormat = Literal["float32", "bfloat16", "int8"]
WEIGHT_FORMATS: tuple[str, ...] = ("float32", "bfloat16", "int8")
LOOPBACK: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """`sfm serve`: where it listens, how many conversations, and what a client may send.

    Binding to anything but loopback needs a token (here or in $SFM_SERVE_TOKEN), which
    every request must carry (`?token=` or `Authorization: Bearer`)."""

    host: str = "127.0.0.1"
    port: int = 8998
    slots: int = 4  # concurrent conversations (engine slots)
    token: str = ""
    weights: WeightFormat = "float32"
    max_message_bytes: int = 1 << 16  # one client message (Opus pages are ~100-300 bytes)
    idle_timeout_s: float = 30.0  # a client silent this long is closed
    max_buffer_s: float = 10.0  # user audio waiting to be processed before a client is closed
    jitter_buffer_s: float = 0.08  # audio a session holds ahead of the clock (network jitter)

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"serve.slots: must be >= 1, got {self.slots}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"serve.port: must lie in [0, 65535], got {self.port}")
        for name in ("max_message_bytes", "idle_timeout_s", "max_buffer_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"serve.{name}: must be > 0, got {getattr(self, name)}")
        if not 0 <= self.jitter_buffer_s < self.max_buffer_s:
            raise ValueError(
                f"serve.jitter_buffer_s: must lie in [0, serve.max_buffer_s), got "
                f"{self.jitter_buffer_s}"
            )
