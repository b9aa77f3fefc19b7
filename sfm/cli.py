"""`sfm <command>`: parses arguments and calls the library; user errors become one line, exit 2.

Each command imports what it needs when it runs, so `sfm --help` starts without jax."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sfm.data.config import DataConfig
from sfm.errors import SfmError
from sfm.infer.config import WEIGHT_FORMATS

if TYPE_CHECKING:
    from sfm.codec.streaming import StreamingCodec
    from sfm.config import Config

EXIT_USER_ERROR = 2
CACHE_ENV = "SFM_COMPILE_CACHE"


def enable_compile_cache() -> None:
    """Keep compiled programs on disk so that later runs start in seconds, not a minute.

    The directory is $SFM_COMPILE_CACHE (`off` disables), else ~/.cache/sfm/jax; a cache
    the user configured for JAX directly is left alone.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    setting = os.environ.get(CACHE_ENV, "")
    if setting.lower() == "off" or jax.config.jax_compilation_cache_dir:
        return
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    jax.config.update("jax_compilation_cache_dir", setting or str(cache_home / "sfm" / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()  # take effect even if something compiled already


def _codec_options(p: argparse.ArgumentParser, channel: bool) -> None:
    """Options shared by the codec subcommands: config, checkpoint, overrides."""
    p.add_argument(
        "--config",
        default=None,
        help="codec preset name (tiny, mimi) or YAML path; "
        "default: the checkpoint's stored config, else mimi",
    )
    p.add_argument("--checkpoint", default=None, help="safetensors parameters (default: random)")
    if channel:
        p.add_argument(
            "--channel",
            type=int,
            default=None,
            help="use this channel of a multi-channel file (default: mix to mono)",
        )
    p.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides such as codec.n_q=4",
    )


def _codec(cfg: Config, args: argparse.Namespace) -> StreamingCodec:
    """The streaming codec of `cfg`, with --checkpoint's parameters when given."""
    from sfm.codec.files import streaming_codec
    from sfm.io.codec import build_codec

    return streaming_codec(build_codec(cfg, args.checkpoint))


def _config(args: argparse.Namespace) -> Config:
    """The config that --config, --checkpoint and the overrides describe."""
    from sfm.io.codec import load_run_config

    return load_run_config(args.config, args.checkpoint, args.overrides)


def _encode(args: argparse.Namespace) -> None:
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


def _decode(args: argparse.Namespace) -> None:
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


def _roundtrip(args: argparse.Namespace) -> None:
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


def _quickstart(args: argparse.Namespace) -> None:
    """`sfm quickstart`: corpus -> codec -> tokens -> pretraining -> duplex -> reply + report."""
    from sfm import quickstart

    quickstart.main(Path(args.out), args.scale)


def _data_synth(args: argparse.Namespace) -> None:
    """`sfm data synth`: write a synthetic speech corpus and print its summary."""
    from sfm.data.synth_corpus import synth_corpus

    print(synth_corpus(args.out, args.minutes, args.engine, args.seed, args.text).line())


def _data_dialogues(args: argparse.Namespace) -> None:
    """`sfm data dialogues`: write synthetic stereo dialogues and print their summary."""
    from sfm.data.dialogues import synth_dialogues

    print(synth_dialogues(args.out, args.minutes, args.seed).line())


def _data_eval_set(args: argparse.Namespace) -> None:
    """`sfm data eval-set`: collect the real-speech evaluation set and print its summary."""
    from sfm.data.real_speech import build_eval_set

    print(build_eval_set(args.out).line())


def _data_train_tokenizer(args: argparse.Namespace) -> None:
    """`sfm data train-tokenizer`: train a SentencePiece model on corpora words or text files."""
    from sfm.data.tokenizer import train_tokenizer, training_texts

    texts = training_texts(args.corpus, args.text)
    print(train_tokenizer(texts, args.out, args.vocab, args.model_type))


def _data_tokenize(args: argparse.Namespace) -> None:
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


def _data_tokenize_text(args: argparse.Namespace) -> None:
    """`sfm data tokenize-text`: text lines -> packed token sequences in ArrayRecord shards."""
    from sfm.data.tokenize import tokenize_text

    summary = tokenize_text(
        args.text_file, args.out, args.tokenizer, args.seq_tokens, args.shard_size
    )
    print(summary.line())


def _train(args: argparse.Namespace) -> None:
    """`sfm train CONFIG [KEY=VALUE ...]`: run or resume a training run."""
    from sfm.train.loop import train

    print(train(_train_config(args)).line())


def _train_config(args: argparse.Namespace) -> Config:
    """The run's config: CONFIG (a YAML path or a train preset name) and the overrides."""
    from sfm.config import load_config, resolve_preset

    return load_config(resolve_preset(args.config, "train"), args.overrides)


def _compile(args: argparse.Namespace) -> int:
    """`sfm compile CONFIG --topology NAME [KEY=VALUE ...]`: the train step's TPU memory report
    (exit 1 when it does not fit, 2 for a bad config; see sfm.train.aot)."""
    from sfm.train import aot

    return aot.run(args.config, args.topology, args.overrides, prefix="sfm: error")


def _infer(args: argparse.Namespace) -> None:
    """`sfm infer`: a recorded user turn through the engine -> stereo WAV + text JSON."""
    from sfm.data.audio import load_audio
    from sfm.infer.converse import converse, load_models
    from sfm.infer.engine import Engine
    from sfm.lm.generate import SamplingConfig
    from sfm.lm.layout import TEXT_EPAD, TEXT_PAD

    codec, lm, cfg = load_models(args.checkpoint, args.config, args.codec, args.overrides)
    user_t = load_audio(args.wav, cfg.codec.sample_rate, args.channel)
    pieces = None
    if args.tokenizer:
        from sfm.data.tokenizer import load_tokenizer

        sp = load_tokenizer(args.tokenizer)
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    sampling = SamplingConfig(greedy=args.greedy)
    engine = Engine(codec, lm, 1, sampling, seed=args.seed, weights=args.weights)
    talk = converse(engine, user_t, pieces, (TEXT_PAD, TEXT_EPAD))
    text = talk.write(args.out)
    lat = engine.latency_ms()
    print(
        f"{args.out}: {talk.frames} frames, {len(talk.text)} text tokens ({text}); real-time "
        f"factor {talk.real_time_factor:.3f}; ms per frame p50 {lat['p50']:.1f}, "
        f"p95 {lat['p95']:.1f}, p99 {lat['p99']:.1f}"
    )


def _pieces(tokenizer: str | None) -> list[str] | None:
    """The text pieces of a SentencePiece model file (None without one)."""
    if not tokenizer:
        return None
    from sfm.data.tokenizer import load_tokenizer

    sp = load_tokenizer(tokenizer)
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def _serve(args: argparse.Namespace) -> None:
    """`sfm serve`: the Moshi-protocol WebSocket server over the engine."""
    import asyncio
    import logging
    import signal

    from sfm.infer.converse import load_models
    from sfm.infer.engine import Engine
    from sfm.infer.server import Server, serve
    from sfm.lm.generate import SamplingConfig
    from sfm.lm.layout import TEXT_EPAD, TEXT_PAD

    flags = {"host": args.host, "port": args.port, "slots": args.slots, "weights": args.weights}
    overrides = [f"serve.{k}={v}" for k, v in flags.items() if v is not None]
    codec, lm, cfg = load_models(
        args.checkpoint, args.config, args.codec, [*args.overrides, *overrides]
    )
    sampling = SamplingConfig(greedy=args.greedy)
    engine = Engine(codec, lm, cfg.serve.slots, sampling, seed=cfg.seed, weights=cfg.serve.weights)
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


def _chat(args: argparse.Namespace) -> None:
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


def _export(args: argparse.Namespace) -> None:
    """`sfm export SOURCE OUT --format F`: a run's weights as an sfm or moshi folder, or the
    engine over them as StableHLO."""
    if args.format == "stablehlo":
        from sfm.infer.stablehlo import export_stablehlo
        from sfm.lm.generate import SamplingConfig

        sampling = SamplingConfig(greedy=args.greedy)
        *files, manifest = export_stablehlo(
            args.source, args.out, args.codec, args.weights, sampling, args.tokenizer
        )
    else:
        from sfm.io.export import export

        if args.weights != "float32" or args.greedy:
            raise SfmError("--weights and --greedy apply to --format stablehlo only")
        *files, manifest = export(args.source, args.out, args.format, args.codec, args.tokenizer)
    for path in files:
        print(f"{path.name}: {path.stat().st_size:,} bytes")
    print(f"manifest: {manifest}")


def _eval_codec(args: argparse.Namespace) -> None:
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


def _eval_lm(args: argparse.Namespace) -> None:
    """`sfm eval lm`: spot-the-word, grammar pairs, spoken QA and text perplexity."""
    from sfm.eval.lm_eval import eval_lm
    from sfm.eval.report import lm_table

    metrics = eval_lm(
        args.checkpoint, args.codec, args.tokenizer, args.out, args.pairs, args.questions
    )
    print("\n".join(lm_table(metrics)))
    print(f"{args.out}/metrics.json, {args.out}/report.md")


def _eval_all(args: argparse.Namespace) -> None:
    """`sfm eval all`: codec, speech-LM and turn-taking evaluations of one run."""
    from sfm.eval.suite import eval_all, run_files

    files = run_files(args.run_dir, args.codec, args.lm, args.tokenizer)
    out = args.out or str(Path(args.run_dir) / "eval_all")
    eval_all(
        args.run_dir, out, files, args.dialogues, args.utterances, args.dialogue_count,
        args.pairs, args.questions,
    )  # fmt: skip
    print(Path(out, "report.md").read_text())


def _eval_duplex(args: argparse.Namespace) -> None:
    """`sfm eval duplex`: turn-taking metrics of scored conversations, or of the model's
    answers to held-out dialogues through the engine."""
    from sfm.eval.duplex import converse_dialogues, score_dialogues
    from sfm.eval.report import duplex_table

    if (args.scored is None) == (args.checkpoint is None and args.config is None):
        raise SfmError("eval duplex: give --scored DIR, or --checkpoint RUN --dialogues DIR")
    if args.scored is not None:
        metrics = score_dialogues(args.scored, args.out, limit=args.limit)
    else:
        from sfm.eval.suite import eval_sampling
        from sfm.infer.converse import load_models
        from sfm.infer.engine import Engine

        if args.dialogues is None:
            raise SfmError("eval duplex --checkpoint: give --dialogues DIR (held-out dialogues)")
        codec, lm, cfg = load_models(args.checkpoint, args.config, args.codec, args.overrides)
        sampling = eval_sampling(cfg.lm.card, args.temp, args.top_k, args.greedy)
        engine = Engine(codec, lm, args.slots, sampling, seed=args.seed, weights=args.weights)
        metrics = converse_dialogues(engine, args.dialogues, args.out, args.limit)
    print("\n".join(duplex_table(metrics)))
    print(f"{args.out}/metrics.json, {args.out}/report.md ({metrics['skipped']['count']} skipped)")


def build_parser() -> argparse.ArgumentParser:
    """The `sfm` argument parser; each leaf sets `run` to its command function, and `jit`
    when the command compiles programs (those use the on-disk compile cache)."""
    parser = argparse.ArgumentParser(prog="sfm", description="Speech foundation model tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    codec = commands.add_parser("codec", help="encode audio to codes and back")
    codec_cmds = codec.add_subparsers(dest="codec_command", required=True, metavar="ACTION")

    enc = codec_cmds.add_parser("encode", help="audio file -> codes (.npz)")
    enc.add_argument("input", help="audio file (any rate; mixed to mono)")
    enc.add_argument("output", help="code file to write (.npz)")
    _codec_options(enc, channel=True)
    enc.set_defaults(run=_encode, jit=True)

    dec = codec_cmds.add_parser("decode", help="codes (.npz) -> WAV")
    dec.add_argument("input", help="code file written by `sfm codec encode`")
    dec.add_argument("output", help="WAV file to write")
    _codec_options(dec, channel=False)
    dec.set_defaults(run=_decode, jit=True)

    rt = codec_cmds.add_parser("roundtrip", help="encode + decode; print quality and bitrate")
    rt.add_argument("input", help="audio file")
    rt.add_argument("--out", default=None, help="also write the decoded audio here")
    _codec_options(rt, channel=True)
    rt.set_defaults(run=_roundtrip, jit=True)

    quick = commands.add_parser(
        "quickstart", help="synthetic data -> codec -> LM pretraining -> duplex -> spoken reply"
    )
    quick.add_argument("--out", default="out/quickstart", help="output folder (rerun resumes)")
    quick.add_argument(
        "--scale",
        "--steps-scale",
        dest="scale",
        type=float,
        default=1.0,
        help="multiply every training length and the corpus (0.05: a smoke run)",
    )
    quick.set_defaults(run=_quickstart, jit=True)

    data = commands.add_parser("data", help="build training data")
    data_cmds = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    syn = data_cmds.add_parser("synth", help="synthetic speech + word alignments + manifest")
    syn.add_argument("--out", required=True, help="output folder (wav/, manifest.jsonl)")
    syn.add_argument("--minutes", type=float, default=10.0, help="minutes of audio to make")
    syn.add_argument("--engine", choices=("espeak", "flite", "both"), default="both")
    syn.add_argument("--seed", type=int, default=0, help="seed for text and voices")
    syn.add_argument("--text", default=None, help="own text file: one sentence per line")
    syn.set_defaults(run=_data_synth)
    dia = data_cmds.add_parser("dialogues", help="stereo two-speaker dialogues + turn events")
    dia.add_argument("--out", required=True, help="output folder (wav/, manifest.jsonl)")
    dia.add_argument("--minutes", type=float, default=10.0, help="minutes of audio to make")
    dia.add_argument("--seed", type=int, default=0, help="seed for text, voices and timing")
    dia.set_defaults(run=_data_dialogues)
    ev = data_cmds.add_parser("eval-set", help="real recorded speech from Debian packages")
    ev.add_argument("--out", required=True, help="output folder (wav/, manifest.jsonl)")
    ev.set_defaults(run=_data_eval_set)
    tt = data_cmds.add_parser("train-tokenizer", help="SentencePiece model (pad 3, epad 0)")
    tt.add_argument("--corpus", action="append", default=[], help="corpus dir (repeatable)")
    tt.add_argument("--text", action="append", default=[], help="text file (repeatable)")
    tt.add_argument("--out", required=True, help="model prefix: writes PREFIX.model")
    tt.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    tt.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    tt.set_defaults(run=_data_train_tokenizer)
    tok = data_cmds.add_parser("tokenize", help="codes + text streams -> ArrayRecord shards")
    tok.add_argument(
        "--data", required=True, help="corpus dir, manifest (.jsonl) or prepared tfds dir"
    )
    tok.add_argument("--out", required=True, help="output folder for the shards")
    tok.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    tok.add_argument("--config", default="tiny", help="codec preset name or YAML path")
    tok.add_argument("--checkpoint", default=None, help="codec parameters (default: random)")
    tok.add_argument("--shard-size", type=int, default=256, help="records per shard")
    tok.add_argument("--batch-size", type=int, default=16, help="codec batch (channels)")
    tok.set_defaults(run=_data_tokenize, jit=True)
    txt = data_cmds.add_parser("tokenize-text", help="text lines -> token ArrayRecord shards")
    txt.add_argument("text_file", metavar="TEXT_FILE", help="UTF-8 text, one document per line")
    txt.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    txt.add_argument("--out", required=True, help="output folder for the shards")
    txt.add_argument(
        "--seq-tokens",
        type=int,
        default=DataConfig.seq_len,
        help="tokens per record",
    )
    txt.add_argument("--shard-size", type=int, default=1024, help="records per shard")
    txt.set_defaults(run=_data_tokenize_text)
    tr = commands.add_parser("train", help="train (or resume) the run a config describes")
    tr.add_argument(
        "config", metavar="CONFIG", help="YAML preset, e.g. configs/train/tiny_pretrain.yaml"
    )
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    tr.set_defaults(run=_train, jit=True)
    comp = commands.add_parser(
        "compile", help="compile the train step for a TPU topology; print memory and FLOPs"
    )
    comp.add_argument("config", metavar="CONFIG", help="YAML preset, e.g. configs/lm/moshi_7b.yaml")
    comp.add_argument("--topology", required=True, help="v5p-128, v5e-16, v6e-64, v4-32, ...")
    comp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    comp.set_defaults(run=_compile)
    inf = commands.add_parser(
        "infer", help="a recorded user turn through the engine: stereo WAV + the model's text"
    )
    inf.add_argument("--checkpoint", help="LM weights: sfm file, run or export folder, Moshi")
    inf.add_argument("--config", help="lm preset or YAML (alone: random weights)")
    inf.add_argument("--codec", help="codec weights: sfm or Kyutai Mimi (default: random)")
    inf.add_argument("--wav", required=True, help="the user's audio")
    inf.add_argument("--channel", type=int, default=None, help="channel of a multi-channel file")
    inf.add_argument("--out", required=True, help="stereo WAV to write (model left, user right)")
    inf.add_argument("--tokenizer", help="SentencePiece model: text pieces in the JSON")
    inf.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    inf.add_argument("--seed", type=int, default=0, help="sampling seed")
    inf.add_argument(
        "--weights",
        default="float32",
        choices=WEIGHT_FORMATS,
        help="how the LM's weights are served (int8: weight-only, per channel)",
    )
    inf.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    inf.set_defaults(run=_infer, jit=True)
    srv = commands.add_parser("serve", help="Moshi-protocol WebSocket server over the engine")
    srv.add_argument("--checkpoint", help="LM weights: sfm file, run or export folder, Moshi")
    srv.add_argument("--config", help="lm preset or YAML (alone: random weights)")
    srv.add_argument("--codec", help="codec weights: sfm or Kyutai Mimi (default: random)")
    srv.add_argument("--tokenizer", help="SentencePiece model: text pieces sent to clients")
    srv.add_argument("--host", help="address to bind (serve.host, default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="port (serve.port, default 8998)")
    srv.add_argument("--slots", type=int, help="concurrent conversations (serve.slots)")
    srv.add_argument("--weights", choices=WEIGHT_FORMATS, help="LM weights as served")
    srv.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    srv.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    srv.set_defaults(run=_serve, jit=True)
    cht = commands.add_parser("chat", help="talk to a Moshi-protocol server with a WAV file")
    cht.add_argument("--url", default="ws://127.0.0.1:8998/api/chat", help="server's /api/chat")
    cht.add_argument("--wav", required=True, help="the user's audio")
    cht.add_argument("--channel", type=int, default=None, help="channel of a multi-channel file")
    cht.add_argument("--out", required=True, help="stereo WAV to write (model left, user right)")
    cht.add_argument("--fast", action="store_true", help="send as fast as possible, not live")
    cht.add_argument("--seed", type=int, default=None, help="the session's sampling seed")
    cht.add_argument("--token", default=None, help="the server's token, if it has one")
    cht.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a reply")
    cht.set_defaults(run=_chat)
    exp = commands.add_parser(
        "export",
        help="a checked folder: sfm's or Kyutai's (moshi) weights, or the engine (stablehlo)",
    )
    exp.add_argument("source", metavar="SOURCE", help="run directory or sfm weights file")
    exp.add_argument("out", metavar="OUT", help="folder to create (must not exist or be empty)")
    exp.add_argument(
        "--format",
        required=True,
        choices=("sfm", "moshi", "stablehlo"),
        help="sfm or Kyutai's (moshi) weights layout, or the engine's functions (stablehlo)",
    )
    exp.add_argument(
        "--weights",
        default="float32",
        choices=WEIGHT_FORMATS,
        help="stablehlo: how the LM's weights are stored (int8: weight-only, per channel)",
    )
    exp.add_argument("--greedy", action="store_true", help="stablehlo: argmax, no sampling")
    exp.add_argument(
        "--codec", default=None, help="codec to include: sfm codec weights or a Kyutai Mimi"
    )
    exp.add_argument("--tokenizer", default=None, help="text tokenizer file to include")
    exp.set_defaults(run=_export)
    _eval_parser(commands)
    return parser


def _eval_parser(commands: argparse._SubParsersAction) -> None:
    """`sfm eval ...`: the evaluations."""
    ev = commands.add_parser("eval", help="evaluate a checkpoint: metrics, report, plots")
    ev_cmds = ev.add_subparsers(dest="eval_command", required=True, metavar="WHAT")
    cod = ev_cmds.add_parser("codec", help="codec vs codec2 / Opus: STOI, PESQ, WER, ...")
    cod.add_argument("checkpoint", help="codec weights: sfm or Kyutai Mimi")
    cod.add_argument("--config", help="codec preset or YAML (default: the checkpoint's)")
    cod.add_argument(
        "--data", nargs="*", help="manifest folders (default: flite speech + the real eval set)"
    )
    cod.add_argument("--out", required=True, help="folder for metrics.json, report.md, plots")
    cod.add_argument("--limit", type=int, help="at most this many utterances per set")
    cod.set_defaults(run=_eval_codec, jit=True)
    eal = ev_cmds.add_parser("all", help="codec + speech LM + turn-taking of a run, one report")
    eal.add_argument("run_dir", metavar="RUN", help="a quickstart-layout folder (codec/, duplex/)")
    eal.add_argument("--out", help="output folder (default: RUN/eval_all)")
    eal.add_argument("--codec", help="codec weights (default: RUN/codec/codec.safetensors)")
    eal.add_argument("--lm", help="LM run (default: RUN/duplex, RUN/pretrain or RUN)")
    eal.add_argument("--tokenizer", help="SentencePiece model (default: RUN/tokens/text.model)")
    eal.add_argument("--dialogues", help="held-out dialogues (default: made, seed 7)")
    eal.add_argument("--utterances", type=int, default=24, help="codec utterances per set")
    eal.add_argument("--dialogue-count", type=int, default=50, help="held-out dialogues")
    eal.add_argument("--pairs", type=int, default=64, help="pairs per spoken LM test")
    eal.add_argument("--questions", type=int, default=24, help="spoken questions")
    eal.set_defaults(run=_eval_all, jit=True)
    elm = ev_cmds.add_parser("lm", help="spot-the-word, grammar pairs, spoken QA, perplexity")
    elm.add_argument("checkpoint", help="LM run or weights (with a stored config)")
    elm.add_argument("--codec", required=True, help="the codec the LM speaks through")
    elm.add_argument("--tokenizer", required=True, help="the LM's SentencePiece model")
    elm.add_argument("--out", required=True, help="folder for metrics.json, report.md, plots")
    elm.add_argument("--pairs", type=int, default=64, help="pairs per spoken test")
    elm.add_argument("--questions", type=int, default=24, help="spoken questions")
    elm.set_defaults(run=_eval_lm, jit=True)
    dup = ev_cmds.add_parser("duplex", help="turn-taking (Full-Duplex-Bench v1 definitions)")
    dup.add_argument("--scored", help="score these conversations (`sfm data dialogues` layout)")
    dup.add_argument("--checkpoint", help="LM weights (a run): answer --dialogues through it")
    dup.add_argument("--config", help="lm preset or YAML (alone: random weights)")
    dup.add_argument("--codec", help="codec weights: sfm or Kyutai Mimi")
    dup.add_argument("--dialogues", help="held-out dialogues whose user channel the model hears")
    dup.add_argument("--out", required=True, help="folder for metrics.json, report.md, plots")
    dup.add_argument("--limit", type=int, help="at most this many dialogues")
    dup.add_argument("--slots", type=int, default=8, help="conversations run at once")
    dup.add_argument("--temp", type=float, default=0.8, help="audio sampling temperature")
    dup.add_argument("--top-k", type=int, help="audio top-k (default: half the codebook)")
    dup.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    dup.add_argument("--seed", type=int, default=0, help="sampling seed")
    dup.add_argument("--weights", default="float32", choices=WEIGHT_FORMATS, help="LM weights")
    dup.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    dup.set_defaults(run=_eval_duplex, jit=True)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, letting KEY=VALUE overrides also follow the options."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


# Exceptions that mean bad input rather than a bug: one line, no traceback.
USER_ERRORS = (SfmError, OSError)


def _one_line(err: Exception) -> str:
    """The error as a single line; OS errors as '<file>: <reason>'."""
    if isinstance(err, OSError) and err.filename is not None:
        text = f"{err.filename}: {err.strerror or err}"
    else:
        text = str(err)
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `sfm` command; returns the exit status (2 for bad input)."""
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed
        return 0 if exit_.code is None else int(exit_.code)
    run: Callable[[argparse.Namespace], int | None] = args.run
    import sfm.host

    try:
        sfm.host.configure(compile_only=args.command == "compile")  # before jax is imported
        if getattr(args, "jit", False):
            enable_compile_cache()
        status = run(args)  # None, or an exit status of the command's own
    except USER_ERRORS as err:
        print(f"sfm: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sfm: interrupted", file=sys.stderr)
        return 130
    return status or 0
