"""The main job, end to end on one machine: data -> codec -> tokens -> LM -> a spoken reply.

`sfm quickstart --out DIR` runs, each stage into its own folder of DIR:

    corpus/      synthetic speech (espeak-ng, flite) and stereo dialogues with word timings
    codec/       the tiny codec trained on that speech (configs/quickstart/codec.yaml)
    tokens/      SentencePiece model; ArrayRecord shards of codes + text streams, text-only
    pretrain/    interleaved speech-text pretraining of the tiny LM (pretrain.yaml)
    duplex/      duplex fine-tuning from the pretraining export (duplex.yaml)
    reply.wav    the engine's live answer to a held-out dialogue's user channel (+ reply.json)
    eval/        `sfm eval codec` (beside codec2 and Opus) and `sfm eval duplex` (turn-taking
                 on 50 held-out dialogues through the engine; duplex_reference/ and
                 duplex_codec/: the dialogues' own replies, clean and through the codec),
                 each with its report
    report.md    loss curves (PNG) and metrics: codec mel distance / SI-SDR against the
                 untrained codec, held-out LM text and semantic-codebook cross-entropy
                 against the unigram entropy of the same targets, the codec and turn-taking
                 tables

A stage whose output is complete is skipped on a rerun (training resumes from its last
checkpoint). `--scale` multiplies every training length and the corpus: 0.05 for a smoke
run, 2 for a run of the same recipe twice as long.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf
from flax import nnx

from sfm.config import Config, load_config
from sfm.data.tokenize import read_shard
from sfm.errors import SfmError
from sfm.quickstart_report import Report, plot_runs, write_report

DEFAULT_OUT = Path("out/quickstart")
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "quickstart"
SPEECH_MINUTES = 20.0
DIALOGUE_MINUTES = 60.0
TEXT_LINES = 20000
VALIDATION_FRACTION = 0.1
EVAL_BATCHES = 16
EVAL_UTTERANCES = 8  # per codec evaluation set
VOCAB = 512  # = lm.text_card of configs/quickstart/pretrain.yaml


class QuickstartError(SfmError, ValueError):
    """A missing tool or failed step of the quickstart; the message is one line."""


def _stage(report: Report, name: str, fn: Callable[[], Any]) -> Any:
    """Run one stage, print its name and time."""
    print(f"[{name}] ...", flush=True)
    t0 = time.perf_counter()
    result = fn()
    report.stage_seconds[name] = time.perf_counter() - t0
    print(f"[{name}] done in {report.stage_seconds[name]:.1f} s", flush=True)
    return result


# ---------------------------------------------------------------- data


def _check_tools() -> None:
    if shutil.which("espeak-ng") is None:
        raise QuickstartError("espeak-ng: not installed; run `bash launch/setup.sh` to install it")


def make_corpus(out: Path, scale: float) -> None:
    """Mono utterances, stereo dialogues and a text file, unless already there."""
    from sfm.data.dialogues import synth_dialogues
    from sfm.data.synth_corpus import synth_corpus
    from sfm.data.text import qa_pairs, sentences

    speech, dialogues, text = out / "speech", out / "dialogues", out / "text.txt"
    size = max(scale, 0.1)  # a smoke run still needs a train and a validation split
    if not (speech / "manifest.jsonl").is_file():
        print(synth_corpus(speech, minutes=SPEECH_MINUTES * size, seed=0).line())
    if not (dialogues / "manifest.jsonl").is_file():
        print(synth_dialogues(dialogues, minutes=DIALOGUE_MINUTES * size, seed=1).line())
    if not text.is_file():
        n = max(200, int(TEXT_LINES * size))
        qa = [f"{p.question.capitalize()}? {p.answer.capitalize()}." for p in qa_pairs(n // 4, 3)]
        text.write_text("\n".join([*sentences(n, 2), *qa]) + "\n")


def tokenize(corpus: Path, codec_ckpt: Path, out: Path) -> Path:
    """SentencePiece model, then code+text shards of both corpora and text-only shards."""
    from sfm.data.tfds_speech import prepare
    from sfm.data.tokenize import tokenize_dataset
    from sfm.data.tokenize_text import tokenize_text
    from sfm.data.tokenizer import train_tokenizer, training_texts

    out.mkdir(parents=True, exist_ok=True)
    spm = out / "text.model"
    if not spm.is_file():
        texts = training_texts([corpus / "speech", corpus / "dialogues"], [corpus / "text.txt"])
        train_tokenizer(texts, out / "text", VOCAB)
    for name, stereo in (("speech", False), ("dialogues", True)):
        builder, _ = prepare(
            corpus / name,
            out / name / "tfds",
            stereo=stereo,
            validation_fraction=VALIDATION_FRACTION,
        )
        summary = tokenize_dataset(
            builder, out / name, codec_config=None, checkpoint=codec_ckpt, tokenizer_path=spm
        )
        print(summary.line())
    if not list((out / "text").glob("text-*.array_record")):
        print(tokenize_text(corpus / "text.txt", out / "text", spm, seq_tokens=100).line())
    return spm


# ---------------------------------------------------------------- training


def stage_config(preset: str, out: Path, scale: float, *overrides: str) -> Config:
    """The config of `sfm train configs/quickstart/PRESET.yaml` into `out` with its steps
    times `scale` (and the logging and checkpoint intervals to suit), then `overrides`."""
    base = load_config(CONFIGS / f"{preset}.yaml", [])
    steps = max(2, round(base.train.steps * scale))
    every = max(1, min(base.train.log_every, steps // 5))
    return load_config(
        CONFIGS / f"{preset}.yaml",
        [
            *overrides,
            f"train.out_dir={out}",
            f"train.steps={steps}",
            f"train.log_every={every}",
            f"train.ckpt_every={max(1, steps // 2)}",
        ],
    )


def _train(preset: str, out: Path, scale: float, *overrides: str) -> Config:
    """Train the quickstart stage `preset` (see `stage_config`); returns its config."""
    from sfm.train.loop import train

    cfg = stage_config(preset, out, scale, *overrides)
    print(train(cfg).line())
    return cfg


# ---------------------------------------------------------------- evaluation


def _validation_wavs(corpus: Path, tokens: Path) -> list[Path]:
    """The held-out utterances: the manifest paths of the validation records."""
    return [
        corpus / r["path"] for r in read_shard(tokens / "validation-00000-of-00001.array_record")
    ]


def evaluate_codec(codec_ckpt: Path, wavs: list[Path]) -> dict[str, float]:
    """Mean mel distance and SI-SDR of held-out utterances, trained codec vs untrained."""
    from sfm.eval.codec_metrics import mel_distance, si_sdr
    from sfm.io.codec import build_codec, load_run_config

    cfg = load_run_config(None, codec_ckpt, ())
    models = {"trained": build_codec(cfg, codec_ckpt), "untrained": build_codec(cfg)}
    sr = cfg.codec.sample_rate
    roundtrip = nnx.jit(lambda m, x: m.decode(m.encode(x)))
    out: dict[str, float] = {}
    for name, model in models.items():
        mel, sdr = [], []
        for path in wavs:
            wav, _ = sf.read(path, dtype="float32", always_2d=True)
            x = wav[:, 0]
            y = np.asarray(roundtrip(model, jnp.asarray(x)[None]))[0, : x.shape[0]]
            mel.append(mel_distance(x, y, sr))
            sdr.append(si_sdr(x, y))
        out[f"{name}_mel"] = float(np.mean(mel))
        out[f"{name}_si_sdr"] = float(np.mean(sdr))
    return out


def _load_lm(cfg: Config, weights: Path) -> nnx.Module:
    """The LM of `cfg` with the exported weights at `weights` (LoRA already merged)."""
    from sfm.train.tasks import LMTask

    no_lora = dataclasses.replace(cfg.train, init_from=str(weights), lora_rank=0)
    return LMTask().build_model(dataclasses.replace(cfg, train=no_lora))


def _entropy(values: np.ndarray) -> float:
    """Entropy (nats) of the empirical distribution of `values`."""
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def evaluate_lm(cfg: Config, weights: Path, source: str, shard: Path) -> dict[str, float]:
    """Held-out text / codebook-0 cross-entropy of the LM at `weights` on windows of `shard`,
    and the unigram entropy of exactly those targets (what a model ignoring context gets)."""
    from sfm.data.pipeline import build_dataset
    from sfm.lm.loss import lm_loss_fn
    from sfm.train.tasks import lm_data_config

    weights_by_source = {"speech": (0, 1, 0, 0), "duplex": (0, 0, 0, 1)}[source]
    data = dataclasses.replace(
        lm_data_config(cfg),
        weights=weights_by_source,
        **{f"{source}_paths": (str(shard),)},
        shard_index=0,
        shard_count=1,
        num_workers=0,
        p_from_start=0.0,  # windows from anywhere, whatever the training drew
    )
    model = _load_lm(cfg, weights)
    loss = nnx.jit(lambda m, b: lm_loss_fn(m, b)[1])
    sums = {"text": 0.0, "cb0": 0.0}
    counts = {"text": 0.0, "cb0": 0.0}
    targets: dict[str, list[np.ndarray]] = {"text": [], "cb0": []}
    batches = iter(build_dataset(data, cfg.lm.layout))
    for _ in range(EVAL_BATCHES):
        batch = next(batches)
        metrics = jax.device_get(loss(model, {"tokens": batch["tokens"], "mask": batch["mask"]}))
        for row, name in ((0, "text"), (1, "cb0")):
            sums[name] += float(metrics[f"{name}_ce"]) * float(metrics[f"{name}_count"])
            counts[name] += float(metrics[f"{name}_count"])
            targets[name].append(batch["tokens"][:, row][batch["mask"][:, row]])
    return {
        **{f"{n}_ce": sums[n] / max(counts[n], 1.0) for n in sums},
        **{f"{n}_unigram": _entropy(np.concatenate(targets[n])) for n in targets},
        **{f"{n}_positions": counts[n] for n in counts},
    }


# ---------------------------------------------------------------- the reply


def generate_reply(
    cfg: Config, weights: Path, codec_ckpt: Path, spm: Path, corpus: Path, shard: Path, out: Path
) -> dict[str, str]:
    """Answer the first held-out dialogue's user channel live, 80 ms at a time, through the
    engine (streaming encode, LM frame step, streaming decode); write reply.wav (left: the
    model, right: the user) and reply.json (its text with times) and return both texts."""
    from sfm.data.audio import load_audio
    from sfm.data.tokenizer import decode_stream, load_tokenizer
    from sfm.infer.converse import converse
    from sfm.infer.engine import Engine
    from sfm.io.codec import build_codec, load_run_config
    from sfm.lm.layout import TEXT_EPAD, TEXT_PAD

    record = next(read_shard(shard))
    codec = build_codec(load_run_config(None, codec_ckpt, ()), codec_ckpt)
    user_t = load_audio(corpus / "dialogues" / record["path"], codec.cfg.sample_rate, channel=1)
    engine = Engine(codec, _load_lm(cfg, weights), 1, cfg.sampling, seed=cfg.seed)
    talk = converse(engine, user_t, pad_ids=(TEXT_PAD, TEXT_EPAD))
    talk.write(out / "reply.wav")
    sp = load_tokenizer(spm)
    return {
        "dialogue": str(record["path"]),
        "seconds": f"{talk.stereo_tc.shape[0] / talk.sample_rate:.1f}",
        "real-time factor": f"{talk.real_time_factor:.2f}",
        "generated assistant text": decode_stream(sp, [token for _, token, _ in talk.text]),
        "reference assistant text": decode_stream(sp, np.asarray(record["text"][0]).tolist()),
        "user text": decode_stream(sp, np.asarray(record["text"][1]).tolist()),
    }


def evaluate_against_anchors(out: Path, scale: float) -> tuple[dict, dict, dict, dict]:
    """The codec beside codec2 / Opus on flite and real speech, and the duplex model's
    turn-taking on held-out dialogues (50, synthesized apart with a seed of their own;
    fewer in a shortened run) through the engine, beside the dialogues' own assistant
    channel scored the same way, clean and through the codec: `sfm eval codec` and
    `sfm eval duplex`."""
    from sfm.eval.codec_eval import codec_system, default_sets, eval_codec
    from sfm.eval.duplex import converse_dialogues, score_dialogues, through_codec
    from sfm.eval.suite import duplex_engine, held_out_dialogues, run_files

    size = min(1.0, scale)
    utterances, dialogues = max(2, round(EVAL_UTTERANCES * size)), max(4, round(50 * size))
    files = run_files(out)
    sets = default_sets(out / "eval", utterances)
    built = codec_system(files.codec)  # compiled once, for both uses
    codec = eval_codec(files.codec, out / "eval" / "codec", sets, utterances, built=built)
    held_out = held_out_dialogues(out / "eval", dialogues)
    duplex = converse_dialogues(duplex_engine(files), held_out, out / "eval" / "duplex", dialogues)
    reference = score_dialogues(held_out, out / "eval" / "duplex_reference", limit=dialogues)
    _, rate, (_, resynthesize) = built
    coded = through_codec(resynthesize, rate, held_out, out / "eval" / "duplex_codec", dialogues)
    return codec, duplex, reference, coded


# ---------------------------------------------------------------- the job


def run_quickstart(out: Path = DEFAULT_OUT, scale: float = 1.0) -> Report:
    """Every stage (see the module doc); returns what report.md shows."""
    if not (scale > 0 and math.isfinite(scale)):
        raise QuickstartError(f"--scale must be a positive number, got {scale}")
    _check_tools()
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out)
    corpus, tokens = out / "corpus", out / "tokens"
    _stage(report, "corpus", lambda: make_corpus(corpus, scale))
    codec_cfg = _stage(
        report,
        "codec",
        lambda: _train("codec", out / "codec", scale, f"codec_train.corpus=[{corpus / 'speech'}]"),
    )
    del codec_cfg
    codec_ckpt = out / "codec" / "codec.safetensors"
    spm = _stage(report, "tokenize", lambda: tokenize(corpus, codec_ckpt, tokens))
    speech = f"{tokens / 'speech' / 'train-*'}"
    pre = _stage(
        report,
        "pretrain",
        lambda: _train(
            "pretrain",
            out / "pretrain",
            scale,
            f"data.speech_paths=[{speech}]",
            f"data.interleaved_paths=[{speech}]",
            f"data.text_paths=[{tokens / 'text' / 'text-*'}]",
        ),
    )
    dup = _stage(
        report,
        "duplex",
        lambda: _train(
            "duplex",
            out / "duplex",
            scale,
            f"data.duplex_paths=[{tokens / 'dialogues' / 'train-*'}]",
            f"train.init_from={out / 'pretrain' / 'lm.safetensors'}",
        ),
    )
    held_speech = tokens / "speech" / "validation-00000-of-00001.array_record"
    held_dialogues = tokens / "dialogues" / "validation-00000-of-00001.array_record"

    def evaluate() -> None:
        wavs = _validation_wavs(corpus / "speech", tokens / "speech")
        report.codec = evaluate_codec(codec_ckpt, wavs)
        report.lm["pretrain"] = evaluate_lm(
            pre, out / "pretrain" / "lm.safetensors", "speech", held_speech
        )
        report.lm["duplex"] = evaluate_lm(
            dup, out / "duplex" / "lm.safetensors", "duplex", held_dialogues
        )

    _stage(report, "evaluate", evaluate)
    (
        report.codec_eval,
        report.duplex_eval,
        report.duplex_reference,
        report.duplex_through_codec,
    ) = _stage(report, "eval", lambda: evaluate_against_anchors(out, scale))
    report.reply = _stage(
        report,
        "reply",
        lambda: generate_reply(
            dup, out / "duplex" / "lm.safetensors", codec_ckpt, spm, corpus, held_dialogues, out
        ),
    )
    plot_runs(out)
    write_report(report)
    return report


def main(out: Path = DEFAULT_OUT, scale: float = 1.0) -> None:
    """Run the quickstart and print where the report went, with its headline numbers."""
    t0 = time.perf_counter()
    report = run_quickstart(out, scale)
    c = report.codec
    print(
        f"codec: mel distance {c['untrained_mel']:.3f} -> {c['trained_mel']:.3f}, "
        f"SI-SDR {c['untrained_si_sdr']:.2f} -> {c['trained_si_sdr']:.2f} dB"
    )
    for run, m in report.lm.items():
        print(
            f"{run}: text CE {m['text_ce']:.3f} (unigram {m['text_unigram']:.3f}), "
            f"semantic CE {m['cb0_ce']:.3f} (unigram {m['cb0_unigram']:.3f})"
        )
    print(f"wrote {out / 'report.md'} and {out / 'reply.wav'} in {time.perf_counter() - t0:.0f} s")
