"""The real-speech evaluation set is built from the Debian packages the set-up installs."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf

from sfm.cli import main
from sfm.data.real_speech import SAMPLE_RATE


def test_eval_set_from_debian_packages(tmp_path, capsys) -> None:
    assert main(["data", "eval-set", "--out", str(tmp_path)]) == 0
    assert "recordings (alsa 8, ktuberling" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    by_source = {s: [r for r in rows if r["source"] == s] for s in ("alsa", "ktuberling", "codec2")}
    assert len(by_source["alsa"]) == 8 and len(by_source["ktuberling"]) >= 60
    assert len(by_source["codec2"]) >= 10
    assert {r["text"] for r in by_source["alsa"]} >= {"front center", "rear left"}
    assert any(r["text"] == "camel" for r in by_source["ktuberling"])
    for row in rows:
        audio, rate = sf.read(tmp_path / row["path"], dtype="float32")
        assert rate == SAMPLE_RATE and audio.ndim == 1
        assert abs(len(audio) / rate - row["duration"]) < 1e-3 and row["duration"] > 0.3
        assert np.sqrt(np.mean(audio**2)) > 1e-3, f"{row['path']} is silent"
