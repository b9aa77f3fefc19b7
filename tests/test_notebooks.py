"""The notebooks in `notebooks/` run top to bottom, headless, each in a fresh work folder
within its time budget (slow: ~2-7 minutes each on 2 cores), and are committed without
outputs, with Colab badges in the README and the same setup cell."""

from __future__ import annotations

import json
import re
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# seconds on the 2-core CI machine, with room for a neighbouring test on the same cores
# (measured two at a time: 01 370, 02 367, 03 558, 04 35)
BUDGET_S = {"01_codec": 600, "02_pretraining": 720, "03_duplex": 900, "04_scaling": 300}
PLOTS = {"01_codec": 3, "02_pretraining": 4, "03_duplex": 4, "04_scaling": 1}  # PNGs drawn
# what the test session sets for itself (tests/conftest.py): a notebook chooses its own
HOST_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "NPROC", "SFM_SET_NPROC")
REPO_URL = re.compile(r'SFM_REPO", "(https://github\.com/[\w.-]+/[\w.-]+)"')


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def test_the_four_notebooks_exist_with_budgets() -> None:
    assert [p.stem for p in NOTEBOOKS] == sorted(BUDGET_S)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path: Path) -> None:
    for i, cell in enumerate(_cells(path)):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name} cell {i}: outputs committed"
            assert cell["execution_count"] is None, f"{path.name} cell {i}: execution count"


def test_same_setup_cell_and_colab_badges() -> None:
    """Every notebook starts (after its title) with the one setup cell, which clones the
    repository the README's badges point at."""
    setups = {p.stem: "".join(_cells(p)[1]["source"]) for p in NOTEBOOKS}
    assert len(set(setups.values())) == 1, "the notebooks' setup cells differ"
    setup = next(iter(setups.values()))
    assert "google.colab" in setup and "pip" in setup and "apt-get" in setup
    apt = re.search(r"APT_PACKAGES=\(([^)]*)\)", (ROOT / "launch" / "setup.sh").read_text())
    needed = set(apt.group(1).split()) - {"chromium", "chromium-driver"}  # for the web page test
    listed = set(re.findall(r"[\w.+-]+", setup))
    missing = sorted(needed - listed)
    assert not missing, f"setup cell: installs less than launch/setup.sh: {missing}"
    url = REPO_URL.search(setup)
    assert url, "setup cell: no SFM_REPO default"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert url.group(1) == project["urls"]["Repository"]
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        repo = url.group(1).removeprefix("https://github.com/")
        badge = f"https://colab.research.google.com/github/{repo}/blob/main/"
        assert f"{badge}notebooks/{path.name}" in readme, f"README: no Colab badge for {path.name}"
    assert all("sfm.host.configure(" in "".join(_cells(p)[2]["source"]) for p in NOTEBOOKS)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cell runs without error (nbclient raises CellExecutionError naming the cell),
    as a user's kernel runs it, and draws its plots; nothing it evaluates is skipped."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SFM_NOTEBOOK_OUT", str(tmp_path))
    for name in HOST_ENV:
        monkeypatch.delenv(name, raising=False)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=BUDGET_S[path.stem], kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
    )  # fmt: skip
    start = time.perf_counter()
    client.execute()  # the kernel inherits this environment
    seconds = time.perf_counter() - start
    print(f"{path.stem}: {seconds:.0f} s")
    budget = BUDGET_S[path.stem]
    assert seconds < budget, f"{path.stem}: {seconds:.0f} s, over its budget of {budget} s"
    outputs = [out for cell in nb.cells for out in cell.get("outputs", [])]
    images = sum("image/png" in out.get("data", {}) for out in outputs)
    assert images == PLOTS[path.stem], f"{path.stem}: {images} plots drawn"
    printed = "".join(out.get("text", "") for out in outputs if out["output_type"] == "stream")
    assert "skipped:" not in printed, f"{path.stem}: an evaluation skipped input"


def test_live_curves_replace_replayed_steps() -> None:
    """A resumed run logs again the steps after its checkpoint: the curve keeps one point
    per step (outside IPython nothing is drawn)."""
    from sfm.notebook import LiveCurves

    curves = LiveCurves(["loss"], "run")
    for step in (1, 2, 3, 4):
        curves(step, {"loss": float(step)})
    for step in (3, 4, 5):  # resumed from the checkpoint at step 2
        curves(step, {"loss": 10.0 * step})
    assert curves.steps == [1, 2, 3, 4, 5]
    assert curves.values["loss"] == [1.0, 2.0, 30.0, 40.0, 50.0]
