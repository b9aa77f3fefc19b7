"""Errors a training run reports to people as one line (light to import)."""

from __future__ import annotations


class TrainingStopped(RuntimeError):
    """Training stopped on a non-finite loss or gradient; the message names the step."""


class CheckpointError(RuntimeError):
    """No checkpoint of a run could be restored; the message names the directory."""
