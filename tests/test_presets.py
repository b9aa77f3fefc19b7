"""Each real-size training preset compiles ahead of time for the TPU topology it is sized for
(libtpu, no TPU needed) and fits its HBM with room to spare. The cheapest compile runs in the
default suite, the others with the slow tests (`.ci/run` runs both)."""

from __future__ import annotations

import importlib.util

import pytest

from sfm.config import load_config, resolve_preset
from sfm.train import aot

# preset under configs/train -> the topology its header comment names
SIZED_FOR = {
    "csm_1b_pretrain": "v6e-8",
    "mimi_codec": "v5e-16",
    "moshi_7b_duplex_full": "v5p-32",
    "moshi_7b_duplex_lora": "v5e-8",
    "moshi_7b_pretrain": "v5p-128",
}
CHEAPEST = "moshi_7b_pretrain"  # ~110 s of compile on 2 cores; the codec's takes ~10 min


def _params() -> list:
    marks = {name: () if name == CHEAPEST else (pytest.mark.slow,) for name in SIZED_FOR}
    return [pytest.param(n, t, marks=marks[n], id=n) for n, t in sorted(SIZED_FOR.items())]


def test_every_real_size_preset_is_sized() -> None:
    tiny = {"tiny_codec", "tiny_duplex", "tiny_pretrain"}
    presets = {p.stem for p in resolve_preset("tiny_codec", "train").parent.glob("*.yaml")}
    assert presets - tiny == set(SIZED_FOR)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the tpu extra")
@pytest.mark.parametrize(("preset", "topology"), _params())
def test_preset_fits_its_topology(preset: str, topology: str) -> None:
    path = resolve_preset(preset, "train")
    assert f"--topology {topology}" in path.read_text()  # the header says how to check it
    report = aot.compile_for_topology(load_config(path), topology, label=preset)
    print(report.table())
    assert report.peak_bytes <= 0.9 * report.hbm_bytes  # 10% headroom at least


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the tpu extra")
@pytest.mark.slow
def test_lora_preset_fits_one_80gb_gpu() -> None:
    """Sized for one 80 GB GPU too: the step compiled for one device (a single v5p chip, as
    AOT compilation targets TPU only) needs at most 90 % of 80 GB."""
    path = resolve_preset("moshi_7b_duplex_lora", "train")
    assert "--topology v5p:1x1x1 mesh=single" in path.read_text()
    cfg = load_config(path, ["mesh=single"])
    report = aot.compile_for_topology(cfg, "v5p:1x1x1", label="moshi_7b_duplex_lora, 1 device")
    print(report.table())
    assert report.peak_bytes <= 0.9 * 80e9
