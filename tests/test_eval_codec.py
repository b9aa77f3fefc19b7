"""`sfm eval codec`: each metric on cases whose answer is known, the delay alignment, the
classical anchors' bitrates, and the command on a tiny codec checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sfm.data.audio import save_audio
from sfm.data.synth import synthesize, voices
from sfm.eval.codec_eval import CLASSICAL, aligned, classical, encode_classical, measure
from sfm.eval.speech import transcribe

RATE = 24000
TEXT = "the answer is seven and that is all"


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    rms = next(v for v in voices("flite") if v.name == "rms")
    return synthesize("The answer is seven, and that is all.", rms, RATE).audio


def test_aligned_takes_out_a_delay(speech):
    delay = 437  # 18 ms
    late = np.concatenate([np.zeros(delay, np.float32), speech])[: len(speech)]
    back = aligned(speech, late, RATE)
    np.testing.assert_array_equal(back[: len(speech) - delay], speech[: len(speech) - delay])


def test_measure_of_the_original(speech):
    m = measure(speech, speech, RATE, TEXT)
    assert m["mel_distance"] == 0.0 and m["si_sdr"] > 100
    assert m["stoi"] == pytest.approx(1.0, abs=1e-6)
    assert m["pesq_wb"] == pytest.approx(4.64, abs=0.01)  # PESQ-WB's ceiling
    assert m["speaker_sim"] == pytest.approx(1.0, abs=1e-6)
    assert m["wer"] == 0.0  # this clear voice and sentence: pocketsphinx gets every word


def test_measure_of_noise(speech):
    """Pure noise scores like no speech at all; speech in noise scores lower, the louder
    the noise, on every metric."""
    noise = np.random.default_rng(0).standard_normal(len(speech)).astype(np.float32)
    m = measure(speech, 0.1 * noise, RATE, TEXT)
    assert m["stoi"] < 0.5 and m["pesq_wb"] < 1.5 and m["si_sdr"] < -10
    assert m["wer"] >= 0.9  # nothing (or noise words) recognized
    power = np.sqrt(np.mean(speech**2) / np.mean(noise**2))
    by_snr = [measure(speech, speech + power * 10 ** (-snr / 20) * noise, RATE, None)
              for snr in (20, 5, -5)]  # fmt: skip
    for key in ("stoi", "pesq_wb", "si_sdr", "speaker_sim"):
        values = [r[key] for r in by_snr]
        assert values[0] > values[1] > values[2], (key, values)
    assert by_snr[0]["si_sdr"] == pytest.approx(20, abs=0.5)


def test_wer_counts_the_edits(speech):
    heard = transcribe(speech, RATE).split()
    assert measure(speech, speech, RATE, " ".join(heard))["wer"] == 0.0
    wrong = " ".join(["eight" if w == "seven" else w for w in heard])
    assert measure(speech, speech, RATE, wrong)["wer"] == 1 / len(heard)  # one substitution
    assert measure(speech, speech, RATE, " ".join(heard[:-2]))["wer"] == 2 / (len(heard) - 2)


@pytest.mark.parametrize("system", list(CLASSICAL))
def test_classical_anchor(speech, system, tmp_path):
    out = classical(speech, RATE, system)
    assert out.shape == speech.shape and not np.array_equal(out, speech)
    m = measure(speech, aligned(speech, out, RATE), RATE, TEXT)
    assert 0.6 < m["stoi"] < 0.99 and 1.0 < m["pesq_wb"] < 4.0, m


def test_classical_bitrates(speech):
    """The anchors run at their nominal bitrates: codec2's fixed-size frames exactly (its
    file header aside), Opus within its container's overhead."""
    seconds = len(speech) / RATE
    for system, (kbps, *_) in CLASSICAL.items():
        _, size = encode_classical(speech, RATE, system)
        measured = size * 8 / seconds / 1000
        if "codec2" in system:
            assert measured == pytest.approx(kbps, rel=0.05), system
        else:
            assert kbps * 0.7 < measured < kbps * 1.5, (system, measured)


def test_eval_codec_command(tmp_path, speech):
    """`sfm eval codec` on a tiny random codec: every row and metric, a skipped file named."""
    from sfm.cli import main
    from sfm.config import dump_yaml
    from sfm.io.codec import build_codec, load_run_config
    from sfm.io.params import save_params

    cfg = load_run_config("tiny", None, ())
    ckpt = tmp_path / "tiny.safetensors"
    save_params(build_codec(cfg), ckpt, dump_yaml(cfg))
    data = tmp_path / "set"
    (data / "wav").mkdir(parents=True)
    save_audio(data / "wav" / "a.wav", speech, RATE)
    (data / "wav" / "broken.wav").write_bytes(b"RIFF....")
    rows = [{"path": "wav/a.wav", "text": TEXT}, {"path": "wav/broken.wav"}]
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["eval", "codec", str(ckpt), "--data", str(data), "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())["set"]
    assert result["utterances"] == 1 and result["skipped"]["count"] == 1
    assert "broken.wav" in result["skipped"]["reasons"][0]
    names = list(result["rows"])
    assert names[0] == "original" and names[1].startswith("tiny") and len(names) == 5
    assert result["rows"]["original"]["wer"] == 0.0
    random_codec = result["rows"][names[1]]
    assert random_codec["bitrate_kbps"] > 0 and random_codec["stoi"] < 0.5  # untrained
    assert (out / "report.md").is_file() and (out / "codec.png").is_file()
