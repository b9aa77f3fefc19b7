"""Markdown reports with plots for the evaluations (matplotlib, no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sfm.eval.anchors import DUPLEX, lookup

DUPLEX_ROWS = (  # (metrics.json path, label, better)
    ("pause_handling.tor", "pause handling TOR", "lower"),
    ("backchannel.tor", "backchannel TOR", "lower"),
    ("backchannel.frequency", "backchannel frequency (1/s)", "higher"),
    ("backchannel.jsd", "backchannel timing JSD", "lower"),
    ("smooth_turn_taking.tor", "smooth turn-taking TOR", "higher"),
    ("smooth_turn_taking.latency_s", "turn-taking latency (s)", "lower"),
    ("user_interruption.tor", "user interruption TOR", "higher"),
    ("user_interruption.latency_s", "interruption stop latency (s)", "lower"),
    ("user_interruption.response_latency_s", "interruption response latency (s)", "lower"),
    ("user_interruption.stop_rate", "stopped within 0.5 s", "higher"),
)
RATE_COUNTS = {  # a rate's path -> the path of the count of events it is a share of
    "pause_handling.tor": "pause_handling.events",
    "backchannel.tor": "backchannel.events",
    "smooth_turn_taking.tor": "smooth_turn_taking.events",
    "user_interruption.tor": "user_interruption.events",
    "user_interruption.stop_rate": "user_interruption.talking_at_barge_in",
}


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers rounded, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def rate_cell(metrics: dict[str, Any], path: str) -> str:
    """A rate of the turn-taking table with its binomial standard error over the events it
    counts, e.g. "0.797 ± 0.032": how far another draw of as many events could move it."""
    value = lookup(metrics, path)
    count = lookup(metrics, RATE_COUNTS[path])
    if value is None or not count:
        return fmt(value)
    return f"{value:.3f} ± {math.sqrt(value * (1.0 - value) / count):.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Lines of a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def duplex_table(
    metrics: dict[str, Any],
    columns: Mapping[str, dict[str, Any]] | None = None,
    targets: Mapping[str, str] | None = None,
) -> list[str]:
    """The turn-taking table: this set's figures, then more measured `columns` (name ->
    metrics, e.g. the dialogues' own assistant channel: the best this data allows), beside
    the published systems'; with `targets` (metrics.json path -> text) a column of them.
    Measured rates carry their standard error (`rate_cell`); the events column counts the
    events behind the first measured column's rates."""
    ours = {"this set" if not columns else "model": metrics, **(columns or {})}
    goals = ["target"] if targets is not None else []
    header = ["metric", "better", *goals, "events", *ours, *DUPLEX]
    rows = []
    for path, label, better in DUPLEX_ROWS:
        goal = [] if targets is None else [targets.get(path, "")]
        rate = path in RATE_COUNTS
        count = lookup(metrics, RATE_COUNTS[path]) if rate else None
        values = [rate_cell(m, path) if rate else lookup(m, path) for m in ours.values()]
        published = [DUPLEX[s].get(path) for s in DUPLEX]
        rows.append([label, better, *goal, "" if count is None else count, *values, *published])
    return markdown_table(header, rows)


def _tor_plot(path: Path, metrics: dict[str, Any]) -> None:
    plt = _pyplot()
    keys = [k for k, label, _ in DUPLEX_ROWS if k.endswith(".tor")]
    systems = {"this set": {k: lookup(metrics, k) for k in keys}, **DUPLEX}
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(systems)
    for i, (name, values) in enumerate(systems.items()):
        heights = [values.get(k) or 0.0 for k in keys]
        ax.bar(np.arange(len(keys)) + i * width, heights, width, label=name)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, [k.split(".")[0] for k in keys])
    ax.set_ylabel("take-over rate")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=len(systems))
    ax.set_title("Take-over rates (missing published values drawn as 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _latency_plot(path: Path, scores: Sequence[Any]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    turn = [v for s in scores for v in s.turn_latency_s]
    stop = [v for s in scores for v in s.stop_latency_s]
    bins = np.linspace(-0.5, 4.0, 19)  # values past either end drawn in the end bins
    turn, stop = (np.clip(v, -0.5, 4.0).tolist() for v in (turn, stop))
    ax.hist([turn, stop], bins, label=["turn-taking latency", "interruption stop latency"])
    ax.set_xlabel("seconds")
    ax.set_ylabel("events")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def timeline_plot(path: Path, dialogue: Any, model: Any, user: Any = None, title: str = "") -> None:
    """Both channels of one dialogue over time: the user's words (from its alignments, else
    what the ASR heard on its channel), the model's voice-active segments and recognized
    words, and the user's events."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 2.8))
    colors = {"turn_end": "tab:green", "pause": "tab:orange", "backchannel": "tab:purple",
              "interruption": "tab:red"}  # fmt: skip
    if dialogue.words is not None:
        spans = [(w.start, w.end) for w, spk in dialogue.words if spk == "SPEAKER_USER"]
    else:
        spans = list(user.segments) if user is not None else []
    ax.broken_barh([(a, b - a) for a, b in spans], (0.6, 0.3), color="tab:blue")
    ax.broken_barh([(a, b - a) for a, b in model.segments], (0.1, 0.3), color="tab:gray")
    for w in model.words:
        ax.text(w.start, 0.45, w.text, fontsize=6, rotation=45)
    for e in dialogue.events:
        ax.axvspan(e.start, max(e.end, e.start + 0.05), color=colors[e.kind], alpha=0.25)
        ax.text(e.start, 1.0, e.kind, fontsize=7, color=colors[e.kind], rotation=30)
    ax.set_yticks([0.25, 0.75], ["model (VAD, ASR)", "user"])
    ax.set_xlabel("seconds")
    ax.set_ylim(0, 1.3)
    ax.set_title(title or dialogue.name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


CODEC_COLUMNS = (  # (metric, label)
    ("bitrate_kbps", "kbit/s"),
    ("mel_distance", "mel dist"),
    ("si_sdr", "SI-SDR dB"),
    ("stoi", "STOI"),
    ("pesq_wb", "PESQ-WB"),
    ("speaker_sim", "spk sim"),
    ("wer", "WER"),
)


def codec_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    """One set's codec table: a row per system (the original first)."""
    header = ["system", *(label for _, label in CODEC_COLUMNS)]
    body = [[name, *(row.get(k) for k, _ in CODEC_COLUMNS)] for name, row in rows.items()]
    return markdown_table(header, body)


def _codec_plot(path: Path, results: dict[str, Any]) -> None:
    plt = _pyplot()
    metrics = [("stoi", "STOI"), ("pesq_wb", "PESQ-WB"), ("speaker_sim", "speaker sim"),
               ("wer", "WER (lower is better)")]  # fmt: skip
    fig, axes = plt.subplots(len(results), len(metrics), figsize=(15, 2.6 * len(results)),
                             squeeze=False)  # fmt: skip
    for r, (set_name, result) in enumerate(results.items()):
        names = [n for n in result["rows"] if n != "original"]
        for c, (key, label) in enumerate(metrics):
            ax = axes[r][c]
            ax.barh(names, [result["rows"][n].get(key) or 0.0 for n in names], color="tab:blue")
            original = result["rows"]["original"].get(key)
            if original is not None:
                ax.axvline(original, color="k", linestyle="--", linewidth=1)
            ax.set_title(f"{label}\n{set_name}", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle("Codec quality (dashed: the original)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_codec_report(out: Path, results: dict[str, Any]) -> Path:
    """out/report.md: a codec table per set and the bar plot."""
    _codec_plot(out / "codec.png", results)
    lines = ["# Codec evaluation", ""]
    for set_name, result in results.items():
        lines += [f"## {set_name} ({result['utterances']} utterances, "
                  f"{result['skipped']['count']} skipped)", ""]  # fmt: skip
        lines += codec_table(result["rows"]) + [""]
    lines += [
        "Resyntheses are aligned to the original before measuring; WER is pocketsphinx's "
        "(the original's row is the recognizer's own error). Published context (LibriSpeech "
        "test-clean): Kyutai Mimi, 8 codebooks (1.1 kbit/s): STOI 0.91, PESQ-WB 2.25, "
        "speaker similarity 0.73.",
        "",
        "![codec quality](codec.png)",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def lm_table(metrics: dict[str, Any]) -> list[str]:
    """The speech-LM table: each measurement beside its chance level."""
    sw, gr, qa, tx = (metrics[k] for k in ("spot_the_word", "grammar", "spoken_qa", "text"))
    rows = [
        ["spot-the-word accuracy (semantic codebook)", sw["semantic"], sw["chance"]],
        ["spot-the-word accuracy (all codebooks)", sw["all_codebooks"], sw["chance"]],
        ["grammar accuracy (semantic codebook)", gr["semantic"], gr["chance"]],
        ["grammar accuracy (all codebooks)", gr["all_codebooks"], gr["chance"]],
        ["spoken QA accuracy (text stream)", qa["by_text"], qa["chance"]],
        ["spoken QA accuracy (ASR of its audio)", qa["by_asr"], qa["chance"]],
        ["text perplexity (held-out lines)", tx["perplexity"], tx["uniform_perplexity"]],
    ]
    return markdown_table(["measurement", "model", "chance"], rows)


def write_lm_report(out: Path, metrics: dict[str, Any]) -> Path:
    """out/report.md: the speech-LM table, a bar plot and the QA transcripts."""
    plt = _pyplot()
    names = ["spot-the-word", "grammar", "QA (text)", "QA (ASR)"]
    values = [metrics["spot_the_word"]["semantic"], metrics["grammar"]["semantic"],
              metrics["spoken_qa"]["by_text"], metrics["spoken_qa"]["by_asr"]]  # fmt: skip
    chance = [0.5, 0.5, 0.0, 0.0]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(names, values, color="tab:blue", label="model")
    ax.scatter(names, chance, color="k", marker="_", s=400, label="chance", zorder=3)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lm.png", dpi=100)
    plt.close(fig)
    lines = ["# Speech LM evaluation", "", *lm_table(metrics), "", "![accuracies](lm.png)", ""]
    lines += ["## Spoken QA", ""]
    lines += markdown_table(
        ["question", "answer", "text stream", "ASR of the audio"],
        [[r["question"], r["answer"], r["text"], r["asr"]] for r in metrics["spoken_qa"]["rows"]],
    )
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_duplex_report(
    out: Path, title: str, metrics: dict[str, Any], scores: Sequence[Any], example: Any
) -> Path:
    """out/report.md with the turn-taking table, its plots and the per-dialogue rows."""
    _tor_plot(out / "tor.png", metrics)
    _latency_plot(out / "latency.png", scores)
    lines = [f"# {title}", "", f"{len(scores)} dialogues scored, "
             f"{metrics['skipped']['count']} skipped, {metrics['unscored_events']} events too "
             "close to the end of their recording to be answered.", ""]  # fmt: skip
    if "engine" in metrics:
        lines += [f"Through the engine: {metrics['engine']['slots']} slots, real-time factor "
                  f"{fmt(metrics['engine']['real_time_factor'])}.", ""]  # fmt: skip
    lines += duplex_table(metrics)
    lines += [
        "",
        "Published figures: Full-Duplex-Bench v1 on real speech (context, not the same data).",
        "",
        "![take-over rates](tor.png)",
        "",
        "![latencies](latency.png)",
    ]
    if example is not None:
        timeline_plot(out / "timeline.png", *example)
        lines += ["", f"![{example[0].name}](timeline.png)"]
    rows = metrics["dialogues"]
    if rows:
        lines += ["", "## Per dialogue", ""]
        lines += markdown_table(list(rows[0]), [list(r.values()) for r in rows])
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


__all__ = [
    "lm_table",
    "write_lm_report",
    "codec_table",
    "write_codec_report",
    "duplex_table",
    "fmt",
    "markdown_table",
    "timeline_plot",
    "write_duplex_report",
]
