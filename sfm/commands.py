"""What each `sfm` command does: one function per leaf of the parser in `sfm.cli`, given its
parsed arguments; each imports what it needs when it runs, so `sfm --help` starts without jax.
User errors are raised as `SfmError` (the CLI prints them as one line)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from sfm.errors import SfmError

if TYPE_CHECKING:
    from sfm.codec.streaming import StreamingCodec
    from sfm.config import Config


def _codec(cfg: Config, args: argparse.Namespace) -> StreamingCodec:
    """The streaming codec of `cfg`, with --checkpoint's parameters when given."""
    from sfm.codec.files import streaming_codec
    from sfm.io.codec import build_codec

    return streaming_codec(build_codec(cfg, args.checkpoint))


def _config(args: argparse.Namespace) -> Config:
    """The config that --config, --checkpoint and the overrides describe."""
    from sfm.io.codec import load_run_config

    return load_run_config(args.config, args.checkpoint, args.overrides)


def encode(args: argparse.Namespace) -> None:
    """`sfm codec encode`: audio file -> code file (inputs are checked before building)."""
    from sfm.codec.files import bitrate_kbps, encode_wav, save_codes
    from sfm.data.audio import load_audio

    cfg = _config(args)
    wav_t = load_audio(args.input, cfg.codec.sample_rate, args.channel)
    codes_kt = encode_wav(_codec(cfg, args), wav_t)
    save_codes(args.output, codes_kt, cfg.codec, wav_t.shape[0])
    print(
        f"{args.output}: {codes_kt.shape[1]} frames x {codes_kt.shape[0]} codebooks "
        f"({bitrate_kbps(cfg.codec):.3f} kbps)"
    )


def decode(args: argparse.Namespace) -> None:
    """`sfm codec decode`: code file -> WAV."""
    from sfm.codec.files import decode_codes, load_codes
    from sfm.data.audio import save_audio

    cfg = _config(args)
    code_file = load_codes(args.input, cfg.codec)
    wav_t = decode_codes(_codec(cfg, args), code_file.codes_kt, code_file.n_samples)
    save_audio(args.output, wav_t, cfg.codec.sample_rate)
    print(
        f"{args.output}: {wav_t.shape[0] / cfg.codec.sample_rate:.2f} s "
        f"at {cfg.codec.sample_rate} Hz"
    )


def roundtrip(args: argparse.Namespace) -> None:
    """`sfm codec roundtrip`: encode + decode one file and print the report."""
    from sfm.codec.files import warm_up
    from sfm.data.audio import load_audio, save_audio
    from sfm.eval.roundtrip import format_rows, roundtrip

    cfg = _config(args)
    wav_t = load_audio(args.input, cfg.codec.sample_rate, args.channel)
    codec = _codec(cfg, args)
    warm_up(codec)
    out_t, report = roundtrip(codec, wav_t)
    if args.out is not None:
        save_audio(args.out, out_t, cfg.codec.sample_rate)
    print(format_rows(report.rows()))


def quickstart(args: argparse.Namespace) -> None:
    """`sfm quickstart`: corpus -> codec -> tokens -> pretraining -> duplex -> reply + report."""
    from sfm import quickstart

    quickstart.main(Path(args.out), args.scale)


def data_synth(args: argparse.Namespace) -> None:
    """`sfm data synth`: write a synthetic speech corpus and print its summary."""
    from sfm.data.synth_corpus import synth_corpus

    print(synth_corpus(args.out, args.minutes, args.engine, args.seed, args.text).line())


def data_dialogues(args: argparse.Namespace) -> None:
    """`sfm data dialogues`: write synthetic stereo dialogues and print their summary."""
    from sfm.data.dialogues import EventShares, synth_dialogues

    given = {"interrupted": args.interrupted, "backchannelled": args.backchannelled}
    shares = EventShares(**{name: v for name, v in given.items() if v is not None})
    print(synth_dialogues(args.out, args.minutes, args.seed, shares).line())


def data_eval_set(args: argparse.Namespace) -> None:
    """`sfm data eval-set`: collect the real-speech evaluation set and print its summary."""
    from sfm.data.real_speech import build_eval_set

    print(build_eval_set(args.out).line())


def data_train_tokenizer(args: argparse.Namespace) -> None:
    """`sfm data train-tokenizer`: train a SentencePiece model on corpora words or text files."""
    from sfm.data.tokenizer import train_tokenizer, training_texts

    texts = training_texts(args.corpus, args.text)
    print(train_tokenizer(texts, args.out, args.vocab, args.model_type))


def data_tokenize(args: argparse.Namespace) -> None:
    """`sfm data tokenize`: codec codes + text streams to ArrayRecord shards."""
    from sfm.data.tokenize import tokenize_dataset

    summary = tokenize_dataset(
        args.data,
        args.out,
        args.config,
        args.checkpoint,
        args.tokenizer,
        args.shard_size,
        args.batch_size,
    )
    print(summary.line())


def data_tokenize_text(args: argparse.Namespace) -> None:
    """`sfm data tokenize-text`: text lines -> packed token sequences in ArrayRecord shards."""
    from sfm.data.tokenize_text import tokenize_text

    summary = tokenize_text(
        args.text_file, args.out, args.tokenizer, args.seq_tokens, args.shard_size
    )
    print(summary.line())


def train(args: argparse.Namespace) -> None:
    """`sfm train CONFIG [KEY=VALUE ...]`: run or resume a training run."""
    from sfm.train.loop import train

    print(train(_train_config(args)).line())


def _train_config(args: argparse.Namespace) -> Config:
    """The run's config: CONFIG (a YAML path or a train preset name) and the overrides."""
    from sfm.config import load_config, resolve_preset

    return load_config(resolve_preset(args.config, "train"), args.overrides)


def aot_compile(args: argparse.Namespace) -> int:
    """`sfm compile CONFIG --topology NAME [KEY=VALUE ...]`: the train step's TPU memory report
    (exit 1 when it does not fit, 2 for a bad config; see sfm.train.aot)."""
    from sfm.train import aot

    return aot.run(args.config, args.topology, args.overrides, prefix="sfm: error")


def infer(args: argparse.Namespace) -> None:
    """`sfm infer`: a recorded user turn through the engine -> stereo WAV + text JSON."""
    from sfm.data.audio import load_audio
    from sfm.infer.converse import converse, load_models
    from sfm.infer.engine import Engine
    from sfm.lm.layout import TEXT_EPAD, TEXT_PAD

    overrides = [*args.overrides, *_greedy(args)]
    codec, lm, cfg = load_models(args.checkpoint, args.config, args.codec, overrides)
    user_t = load_audio(args.wav, cfg.codec.sample_rate, args.channel)
    pieces = _pieces(args.tokenizer)
    engine = Engine(codec, lm, 1, cfg.sampling, seed=args.seed, weights=args.weights)
    talk = converse(engine, user_t, pieces, (TEXT_PAD, TEXT_EPAD))
    text = talk.write(args.out)
    lat = engine.latency_ms()
    print(
        f"{args.out}: {talk.frames} frames, {len(talk.text)} text tokens ({text}); real-time "
        f"factor {talk.real_time_factor:.3f}; ms per frame p50 {lat['p50']:.1f}, "
        f"p95 {lat['p95']:.1f}, p99 {lat['p99']:.1f}"
    )


def _greedy(args: argparse.Namespace) -> list[str]:
    """`--greedy` as the override of the run's own sampling (`sampling.greedy`)."""
    return ["sampling.greedy=true"] if args.greedy else []


def _pieces(tokenizer: str | None) -> list[str] | None:
    """The text pieces of a SentencePiece model file (None without one)."""
    if not tokenizer:
        return None
    from sfm.data.tokenizer import load_tokenizer

    sp = load_tokenizer(tokenizer)
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def serve(args: argparse.Namespace) -> None:
    """`sfm serve`: the Moshi-protocol WebSocket server over the engine."""
    import asyncio
    import logging
    import signal

    from sfm.infer.converse import load_models
    from sfm.infer.engine import Engine
    from sfm.infer.server import Server, serve
    from sfm.lm.layout import TEXT_EPAD, TEXT_PAD

    flags = {"host": args.host, "port": args.port, "slots": args.slots, "weights": args.weights}
    overrides = [f"serve.{k}={v}" for k, v in flags.items() if v is not None]
    codec, lm, cfg = load_models(
        args.checkpoint, args.config, args.codec, [*args.overrides, *overrides, *_greedy(args)]
    )
    engine = Engine(
        codec, lm, cfg.serve.slots, cfg.sampling, seed=cfg.seed, weights=cfg.serve.weights
    )
    server = Server(engine, cfg.serve, _pieces(args.tokenizer), (TEXT_PAD, TEXT_EPAD))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    async def run() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):  # stop cleanly: sessions closed
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        runner = await serve(server, cfg.serve)
        print(
            f"serving {cfg.serve.slots} slots on http://{cfg.serve.host}:{cfg.serve.port}",
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
        print("stopped", flush=True)

    asyncio.run(run())


def chat(args: argparse.Namespace) -> None:
    """`sfm chat`: a recorded user turn through a Moshi-protocol server."""
    import asyncio

    from sfm.data.audio import load_audio
    from sfm.infer.client import chat, with_query

    user_t = load_audio(args.wav, 24000, args.channel)
    url = with_query(args.url, seed=args.seed, token=args.token)
    talk = asyncio.run(chat(url, user_t, fast=args.fast, timeout_s=args.timeout))
    text = talk.write(args.out)
    print(
        f"{args.out}: {talk.stereo_tc.shape[0] / talk.sample_rate:.1f} s, {len(talk.text)} text "
        f"pieces ({text}); wall time {talk.seconds:.1f} s"
    )


def export(args: argparse.Namespace) -> None:
    """`sfm export SOURCE OUT --format F`: a run's weights as an sfm or moshi folder, or the
    engine over them as StableHLO."""
    if args.format == "stablehlo":
        from sfm.infer.stablehlo import export_stablehlo

        *files, manifest = export_stablehlo(
            args.source, args.out, args.codec, args.weights, _greedy(args), args.tokenizer
        )
    else:
        from sfm.io.export import export

        if args.weights != "float32" or args.greedy:
            raise SfmError("--weights and --greedy apply to --format stablehlo only")
        *files, manifest = export(args.source, args.out, args.format, args.codec, args.tokenizer)
    for path in files:
        print(f"{path.name}: {path.stat().st_size:,} bytes")
    print(f"manifest: {manifest}")


def eval_codec(args: argparse.Namespace) -> None:
    """`sfm eval codec`: a codec checkpoint beside codec2 and Opus on synthetic and real speech."""
    from sfm.eval.codec_eval import eval_codec
    from sfm.eval.report import codec_table

    sets = None
    if args.data:
        names = [Path(d).name for d in args.data]
        sets = {(n if names.count(n) == 1 else d): d for n, d in zip(names, args.data)}
    results = eval_codec(args.checkpoint, args.out, sets, args.limit, args.config)
    for set_name, result in results.items():
        print(
            f"{set_name}: {result['utterances']} utterances, {result['skipped']['count']} skipped"
        )
        print("\n".join(codec_table(result["rows"])))
    print(f"{args.out}/metrics.json, {args.out}/report.md")


def eval_lm(args: argparse.Namespace) -> None:
    """`sfm eval lm`: spot-the-word, grammar pairs, spoken QA and text perplexity."""
    from sfm.eval.lm_eval import eval_lm
    from sfm.eval.report import lm_table

    metrics = eval_lm(
        args.checkpoint, args.codec, args.tokenizer, args.out, args.pairs, args.questions
    )
    print("\n".join(lm_table(metrics)))
    print(f"{args.out}/metrics.json, {args.out}/report.md")


def eval_all(args: argparse.Namespace) -> None:
    """`sfm eval all`: codec, speech-LM and turn-taking evaluations of one run."""
    from sfm.eval.suite import eval_all, run_files

    files = run_files(args.run_dir, args.codec, args.lm, args.tokenizer)
    out = args.out or str(Path(args.run_dir) / "eval_all")
    eval_all(
        args.run_dir, out, files, args.dialogues, args.utterances, args.dialogue_count,
        args.pairs, args.questions,
    )  # fmt: skip
    print(Path(out, "report.md").read_text())


def eval_duplex(args: argparse.Namespace) -> None:
    """`sfm eval duplex`: turn-taking metrics of scored conversations, or of the model's
    answers to held-out dialogues through the engine."""
    from sfm.eval.duplex import converse_dialogues, score_dialogues
    from sfm.eval.report import duplex_table

    if (args.scored is None) == (args.checkpoint is None and args.config is None):
        raise SfmError("eval duplex: give --scored DIR, or --checkpoint RUN --dialogues DIR")
    if args.scored is not None:
        metrics = score_dialogues(args.scored, args.out, limit=args.limit)
    else:
        from sfm.infer.converse import load_models
        from sfm.infer.engine import Engine

        if args.dialogues is None:
            raise SfmError("eval duplex --checkpoint: give --dialogues DIR (held-out dialogues)")
        overrides = [*args.overrides, *_greedy(args)]
        codec, lm, cfg = load_models(args.checkpoint, args.config, args.codec, overrides)
        engine = Engine(codec, lm, args.slots, cfg.sampling, seed=args.seed, weights=args.weights)
        metrics = converse_dialogues(engine, args.dialogues, args.out, args.limit)
    print("\n".join(duplex_table(metrics)))
    print(f"{args.out}/metrics.json, {args.out}/report.md ({metrics['skipped']['count']} skipped)")
