"""What the notebooks in `notebooks/` share: their work folder and live training curves.

    from sfm.notebook import train_live, work_dir
    summary = train_live(cfg, ("text_ce", "cb0_ce"))  # trains, redrawing the curves as it goes

Outside IPython `train_live` trains and draws nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfm.config import Config

if TYPE_CHECKING:
    from sfm.train.loop import RunSummary

WORK_ENV = "SFM_NOTEBOOK_OUT"  # where the notebooks write (CI gives each its own folder)
DEFAULT_WORK = Path("out/notebooks")
SMOOTH = 10  # steps in the running mean drawn over each curve


def work_dir() -> Path:
    """The notebooks' work folder: $SFM_NOTEBOOK_OUT, else out/notebooks (created)."""
    path = Path(os.environ.get(WORK_ENV) or DEFAULT_WORK)
    path.mkdir(parents=True, exist_ok=True)
    return path


class LiveCurves:
    """Metrics of a training run redrawn in place while it runs (`on_step` of `train`)."""

    def __init__(self, columns: Sequence[str], title: str, every_s: float = 3.0) -> None:
        import matplotlib.pyplot as plt

        self.columns, self.title, self.every_s = tuple(columns), title, every_s
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {c: [] for c in self.columns}
        self.fig, self.ax = plt.subplots(figsize=(7, 3.2))
        plt.close(self.fig)  # drawn through the display handle only
        self._handle = _display(self.fig)
        self._drawn = time.perf_counter()

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        while self.steps and self.steps[-1] >= step:  # a resumed run replays these steps
            self.steps.pop()
            for c in self.columns:
                self.values[c].pop()
        self.steps.append(step)
        for c in self.columns:
            self.values[c].append(metrics.get(c, float("nan")))
        if self._handle is not None and time.perf_counter() - self._drawn >= self.every_s:
            self.draw()

    def draw(self) -> None:
        """Each metric faintly per step, and its running mean over `SMOOTH` steps."""
        import numpy as np

        if self._handle is None:
            return
        self.ax.clear()
        for c in self.columns:
            values = np.asarray(self.values[c], np.float64)
            (line,) = self.ax.plot(self.steps, values, alpha=0.3)
            if len(values) >= SMOOTH:
                mean = np.convolve(values, np.ones(SMOOTH) / SMOOTH, mode="valid")
                self.ax.plot(self.steps[SMOOTH - 1 :], mean, color=line.get_color(), label=c)
            else:
                line.set_label(c)
        self.ax.set_title(self.title)
        self.ax.set_xlabel("step")
        self.ax.legend(loc="upper right")
        self.fig.tight_layout()
        self._handle.update(self.fig)
        self._drawn = time.perf_counter()


def _display(fig: Any) -> Any:
    """A display handle for `fig` in IPython, else None."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return None
    if get_ipython() is None:
        return None
    return display(fig, display_id=True)


def train_live(cfg: Config, columns: Sequence[str], title: str | None = None) -> RunSummary:
    """`sfm.train.loop.train(cfg)` with `columns` of its metrics drawn live (the steps of an
    earlier, resumed part of the run included); returns the run's summary."""
    from sfm.train.loop import train
    from sfm.train.metrics import read_metrics

    curves = LiveCurves(columns, title or f"{cfg.train.task}: {Path(cfg.train.out_dir).name}")
    for row in read_metrics(Path(cfg.train.out_dir)):
        curves(int(row["step"]), row)
    summary = train(cfg, on_step=curves)
    curves.draw()
    print(summary.line())
    return summary
