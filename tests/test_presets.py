"""Each real-size training preset compiles ahead of time for the TPU topology it is sized for
(libtpu, no TPU needed) and fits its HBM with room to spare."""

from __future__ import annotations

import importlib.util

import pytest

from sfm.config import load_config, resolve_preset
from sfm.train import aot

# preset under configs/train -> the topology its header comment names
SIZED_FOR = {"moshi_7b_duplex_lora": "v5e-8", "moshi_7b_pretrain": "v5p-128"}


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the tpu extra")
@pytest.mark.slow
@pytest.mark.parametrize(("preset", "topology"), sorted(SIZED_FOR.items()))
def test_preset_fits_its_topology(preset: str, topology: str) -> None:
    path = resolve_preset(preset, "train")
    assert f"--topology {topology}" in path.read_text()  # the header says how to check it
    report = aot.compile_for_topology(load_config(path), topology, label=preset)
    print(report.table())
    assert report.peak_bytes <= 0.9 * report.hbm_bytes  # 10% headroom at least
