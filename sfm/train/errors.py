"""Errors a training run reports to people as one line (light to import)."""

from __future__ import annotations

from sfm.errors import SfmError


class TrainingStopped(SfmError, RuntimeError):
    """Training stopped on a non-finite loss or gradient; the message names the step."""
