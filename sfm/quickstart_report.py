"""The quickstart's report: what each stage measured, as report.md with its loss curves.

`sfm.quickstart` fills a `Report` stage by stage; `plot_runs` draws codec.png and lm.png from
the runs' metrics.jsonl, and `write_report` writes report.md: stage times, the codec and LM
metrics, the codec and turn-taking tables against the targets below and the anchors, the
reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What the quickstart's duplex model should reach on the held-out dialogues (Full-Duplex-Bench
# v1 definitions, metrics.json paths) and its codec on held-out flite speech.
TURN_TAKING_TARGETS = {
    "pause_handling.tor": "<= 0.3",
    "smooth_turn_taking.tor": ">= 0.8",
    "smooth_turn_taking.latency_s": "<= 0.5",
    "user_interruption.tor": ">= 0.8",
    "user_interruption.latency_s": "<= 0.5",
}
CODEC_TARGETS = (
    "WER <= 0.5 and a mel distance well below the first quickstart codec's (0.87 on the "
    "held-out utterances of the table above)"
)


@dataclass
class Report:
    """Everything report.md shows, filled stage by stage."""

    out: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    codec: dict[str, float] = field(default_factory=dict)
    lm: dict[str, dict[str, float]] = field(default_factory=dict)
    reply: dict[str, str] = field(default_factory=dict)
    codec_eval: dict[str, Any] = field(default_factory=dict)  # `sfm eval codec`'s results
    duplex_eval: dict[str, Any] = field(default_factory=dict)  # `sfm eval duplex`'s metrics
    duplex_reference: dict[str, Any] = field(default_factory=dict)  # the data's own assistant
    duplex_through_codec: dict[str, Any] = field(default_factory=dict)  # ... through the codec


def _plot(path: Path, title: str, curves: dict[str, tuple[list[int], list[float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_runs(out: Path) -> None:
    """codec.png (the codec's mel loss) and lm.png (text / cb0 CE per LM run)."""
    from sfm.train.metrics import read_metrics

    codec = read_metrics(out / "codec")
    steps = [r["step"] for r in codec]
    _plot(out / "codec.png", "codec training", {"mel loss": (steps, [r["mel"] for r in codec])})
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for run in ("pretrain", "duplex"):
        rows = read_metrics(out / run)
        x = [r["step"] for r in rows]
        curves[f"{run} text CE"] = (x, [r["text_ce"] for r in rows])
        curves[f"{run} cb0 CE"] = (x, [r["cb0_ce"] for r in rows])
    _plot(out / "lm.png", "LM training (nats)", curves)


def write_report(report: Report) -> Path:
    """report.md: stage times, codec and LM metrics, the evaluations, the reply."""
    from sfm.eval.report import codec_table, duplex_table

    c = report.codec
    lines = [
        "# sfm quickstart",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in report.stage_seconds.items()],
        "",
        "## Codec (held-out utterances)",
        "",
        "| codec | mel distance | SI-SDR (dB) |",
        "|---|---:|---:|",
        f"| untrained | {c['untrained_mel']:.3f} | {c['untrained_si_sdr']:.2f} |",
        f"| trained | {c['trained_mel']:.3f} | {c['trained_si_sdr']:.2f} |",
        "",
        "![codec](codec.png)",
        "",
        "## LM (held-out windows, nats per token)",
        "",
        "The unigram entropy is that of the very targets scored: the best any model that",
        "ignores context can do.",
        "",
        "| run | stream | cross-entropy | unigram entropy | ratio | positions |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for run, m in report.lm.items():
        for stream, name in (("text", "text"), ("cb0", "semantic codebook")):
            ce, base = m[f"{stream}_ce"], m[f"{stream}_unigram"]
            lines.append(
                f"| {run} | {name} | {ce:.3f} | {base:.3f} | {ce / base:.2f} | "
                f"{int(m[f'{stream}_positions'])} |"
            )
    lines += ["", "![lm](lm.png)", ""]
    for set_name, result in report.codec_eval.items():
        lines += [f"## Codec beside classical codecs: {set_name} ({result['utterances']} "
                  "utterances)", "", *codec_table(result["rows"]), ""]  # fmt: skip
    if report.codec_eval:
        lines += [f"Targets: {CODEC_TARGETS}. WER: pocketsphinx (the original's row is the "
                  "recognizer's own). Details: eval/codec/report.md.", ""]  # fmt: skip
    if report.duplex_eval:
        n = len(report.duplex_eval["dialogues"])
        lines += [f"## Turn-taking ({n} held-out dialogues, through the engine)", ""]
        columns = {"reference assistant": report.duplex_reference,
                   "reference through the codec": report.duplex_through_codec}  # fmt: skip
        lines += [*duplex_table(report.duplex_eval, columns, TURN_TAKING_TARGETS), ""]
        lines += ["The reference assistant is the held-out dialogues' own assistant channel "
                  "scored the same way: the best this data allows under the benchmark's rules "
                  "(a one-word reply does not take the turn); through the codec, the same "
                  "channel encoded and decoded by the quickstart codec: the best a model "
                  "speaking through that codec can score (the scorer hears speech through "
                  "VAD and ASR). Rates carry one binomial standard error over the events "
                  "they count (the events column): another held-out set of this size could "
                  "move them about that much. Published figures: Full-Duplex-Bench v1 on "
                  "real speech, for context. More plots: eval/duplex/report.md.", ""]  # fmt: skip
        if (report.out / "eval" / "duplex" / "timeline.png").is_file():
            lines += ["The model (VAD segments, ASR words) and the user over one held-out "
                      "dialogue, its events marked:", "",
                      "![timeline](eval/duplex/timeline.png)", ""]  # fmt: skip
    lines += ["## Reply (reply.wav: left generated, right user)", ""]
    lines += [f"- {k}: {v}" for k, v in report.reply.items()]
    path = report.out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
