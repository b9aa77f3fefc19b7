"""Published and measured figures that sfm's evaluations print beside their own (context:
other systems, other data). Keys are metrics.json paths."""

from __future__ import annotations

# Full-Duplex-Bench v1, real speech, Parakeet ASR (the benchmark's paper and PersonaPlex's).
# Their interruption latency runs from the end of the interruption to the response.
DUPLEX: dict[str, dict[str, float]] = {
    "Moshi": {
        "pause_handling.tor": 0.985,
        "smooth_turn_taking.tor": 0.941,
        "smooth_turn_taking.latency_s": 0.265,
        "user_interruption.tor": 1.0,
        "user_interruption.response_latency_s": 0.257,
        "backchannel.frequency": 0.001,
    },
    "PersonaPlex": {
        "pause_handling.tor": 0.584,
        "smooth_turn_taking.tor": 0.992,
        "smooth_turn_taking.latency_s": 0.070,
        "user_interruption.tor": 1.0,
        "user_interruption.response_latency_s": 0.400,
        "backchannel.jsd": 0.649,
    },
    "GPT-Realtime": {
        "pause_handling.tor": 0.010,
        "smooth_turn_taking.tor": 1.0,
        "smooth_turn_taking.latency_s": 1.47,
    },
    "Freeze-Omni": {
        "pause_handling.tor": 0.642,
        "smooth_turn_taking.tor": 0.336,
        "smooth_turn_taking.latency_s": 0.953,
    },
}


def lookup(metrics: dict, path: str) -> float | None:
    """metrics["a"]["b"] for path "a.b" (None where absent)."""
    node = metrics
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, int | float) else None
