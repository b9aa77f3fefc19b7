"""The quickstart end to end at a twentieth of its training length: every stage runs, the
report and the reply are written, pretraining lowers the loss and duplex fine-tuning starts
from its weights, a rerun skips finished work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from sfm import quickstart
from sfm.train.metrics import read_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed"),
]
SCALE = 0.05


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, quickstart.Report]:
    out = tmp_path_factory.mktemp("quickstart")
    return out, quickstart.run_quickstart(out, SCALE)


def _losses(path: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in path.read_text().splitlines()]


def _unweighted(run: Path) -> list[float]:
    """The run's loss per logged step with the text term at weight 1 (the stages weigh it
    differently)."""
    return [row["text_loss"] + row["audio_loss"] for row in read_metrics(run)]


def test_every_stage_ran_and_training_lowered_the_losses(
    run: tuple[Path, quickstart.Report],
) -> None:
    out, report = run
    assert list(report.stage_seconds) == [
        "corpus",
        "codec",
        "tokenize",
        "pretrain",
        "duplex",
        "evaluate",
        "eval",
        "reply",
    ]
    mel = _losses(out / "codec" / "metrics.jsonl", "mel")
    assert len(mel) == 30 and min(mel[-3:]) < mel[0]
    pretrain = _losses(out / "pretrain" / "metrics.jsonl", "loss")
    assert pretrain[-1] < pretrain[0]
    # 20 fine-tuning steps are too few for a trend; that they start from the pretrained
    # weights (not a fresh model at ~ln(vocab) per stream) is what shows here.
    assert _unweighted(out / "duplex")[0] < _unweighted(out / "pretrain")[0] / 2
    assert (out / "pretrain" / "lm.safetensors").is_file()
    assert (out / "duplex" / "lm.safetensors").is_file()
    assert report.codec["trained_mel"] < report.codec["untrained_mel"]
    for metrics in report.lm.values():
        assert metrics["text_positions"] > 0 and metrics["cb0_positions"] > 0
        assert 0 <= metrics["text_unigram"] and 0 <= metrics["text_ce"] < 10


def test_report_and_reply(run: tuple[Path, quickstart.Report]) -> None:
    out, report = run
    text = (out / "report.md").read_text()
    assert "unigram entropy" in text and "SI-SDR" in text
    assert (out / "codec.png").stat().st_size > 0 and (out / "lm.png").stat().st_size > 0
    info = sf.info(out / "reply.wav")
    assert info.samplerate == 24000 and info.channels == 2
    assert abs(info.frames / info.samplerate - float(report.reply["seconds"])) < 0.1
    assert report.reply["reference assistant text"]
    # the evaluations against the anchors: both codec sets, the held-out dialogues
    assert "codec2 1200 bit/s" in text and "smooth turn-taking TOR" in text
    assert set(report.codec_eval) == {"synthetic (flite)", "real speech"}
    assert report.duplex_eval["skipped"]["count"] == 0
    assert len(report.duplex_eval["dialogues"]) == 4  # 50 at full length
    # the dialogues' own assistant channel through the quickstart codec, and the targets
    assert len(report.duplex_through_codec["dialogues"]) == 4
    assert "reference through the codec" in text and "| >= 0.8 |" in text
    assert "![timeline](eval/duplex/timeline.png)" in text
    for name in ("codec/report.md", "duplex/report.md", "duplex/timeline.png",
                 "duplex_codec/metrics.json"):  # fmt: skip
        assert (out / "eval" / name).is_file(), name


def test_eval_all_on_the_run(run: tuple[Path, quickstart.Report]) -> None:
    """`sfm eval all` on the quickstart's folder: codec, speech-LM and turn-taking reports."""
    from sfm.cli import main

    out, _ = run
    argv = ["eval", "all", str(out), "--utterances", "2", "--dialogue-count", "4"]
    assert main([*argv, "--pairs", "4", "--questions", "2"]) == 0
    report = (out / "eval_all" / "report.md").read_text()
    for heading in ("## Codec: real speech", "## Speech LM", "## Turn-taking"):
        assert heading in report, heading
    lm = json.loads((out / "eval_all" / "lm" / "metrics.json").read_text())
    assert lm["spoken_qa"]["questions"] == 2 and lm["pairs"] == 4
    assert lm["text"]["perplexity"] < lm["text"]["uniform_perplexity"]  # it learned text
    for name in ("codec/codec.png", "lm/lm.png", "duplex/timeline.png"):
        assert (out / "eval_all" / name).is_file(), name


def test_rerun_skips_finished_stages(run: tuple[Path, quickstart.Report]) -> None:
    out, first = run
    again = quickstart.run_quickstart(out, SCALE)
    for stage in ("corpus", "codec", "tokenize", "pretrain", "duplex"):
        assert again.stage_seconds[stage] < first.stage_seconds[stage], stage
    assert again.lm == first.lm and again.codec == first.codec


def test_bad_scale_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(quickstart.QuickstartError, match="--scale must be a positive"):
        quickstart.run_quickstart(tmp_path, 0.0)
