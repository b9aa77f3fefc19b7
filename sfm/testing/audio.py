"""Test audio that moves a codec's codes: a gliding tone with a little noise (no torch)."""

from __future__ import annotations

import numpy as np

RATE = 24000


def gliding_tone(samples: int, rng: np.random.Generator, rate: int = RATE) -> np.ndarray:
    """float32 [samples]: a tone gliding around a random pitch in 100-300 Hz, plus noise."""
    t = np.arange(samples) / rate
    f0 = rng.uniform(100, 300) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
    wav = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / rate) + 0.02 * rng.standard_normal(samples)
    return wav.astype(np.float32)
