"""`sfm <command>`: parses arguments and calls the command (`sfm.commands`); user errors become
one line, exit 2.

Each command imports what it needs when it runs, so `sfm --help` starts without jax."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sfm import commands as cmd
from sfm.data.config import DataConfig
from sfm.errors import SfmError
from sfm.infer.config import WEIGHT_FORMATS

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
    enc.set_defaults(run=cmd.encode, jit=True)

    dec = codec_cmds.add_parser("decode", help="codes (.npz) -> WAV")
    dec.add_argument("input", help="code file written by `sfm codec encode`")
    dec.add_argument("output", help="WAV file to write")
    _codec_options(dec, channel=False)
    dec.set_defaults(run=cmd.decode, jit=True)

    rt = codec_cmds.add_parser("roundtrip", help="encode + decode; print quality and bitrate")
    rt.add_argument("input", help="audio file")
    rt.add_argument("--out", default=None, help="also write the decoded audio here")
    _codec_options(rt, channel=True)
    rt.set_defaults(run=cmd.roundtrip, jit=True)

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
    quick.set_defaults(run=cmd.quickstart, jit=True)

    data = commands.add_parser("data", help="build training data")
    data_cmds = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    syn = data_cmds.add_parser("synth", help="synthetic speech + word alignments + manifest")
    syn.add_argument("--out", required=True, help="output folder (wav/, manifest.jsonl)")
    syn.add_argument("--minutes", type=float, default=10.0, help="minutes of audio to make")
    syn.add_argument("--engine", choices=("espeak", "flite", "both"), default="both")
    syn.add_argument("--seed", type=int, default=0, help="seed for text and voices")
    syn.add_argument("--text", default=None, help="own text file: one sentence per line")
    syn.set_defaults(run=cmd.data_synth)
    dia = data_cmds.add_parser("dialogues", help="stereo two-speaker dialogues + turn events")
    dia.add_argument("--out", required=True, help="output folder (wav/, manifest.jsonl)")
    dia.add_argument("--minutes", type=float, default=10.0, help="minutes of audio to make")
    dia.add_argument("--seed", type=int, default=0, help="seed for text, voices and timing")
    dia.add_argument(
        "--interrupted", type=float, help="share of replies the user barges into (0.3)"
    )
    dia.add_argument("--backchannelled", type=float, help="share given a backchannel (0.45)")
    dia.set_defaults(run=cmd.data_dialogues)
    ev = data_cmds.add_parser("eval-set", help="real recorded speech from Debian packages")
    ev.add_argument("--out", required=True, help="output folder (wav/, manifest.jsonl)")
    ev.set_defaults(run=cmd.data_eval_set)
    tt = data_cmds.add_parser("train-tokenizer", help="SentencePiece model (pad 3, epad 0)")
    tt.add_argument("--corpus", action="append", default=[], help="corpus dir (repeatable)")
    tt.add_argument("--text", action="append", default=[], help="text file (repeatable)")
    tt.add_argument("--out", required=True, help="model prefix: writes PREFIX.model")
    tt.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    tt.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    tt.set_defaults(run=cmd.data_train_tokenizer)
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
    tok.set_defaults(run=cmd.data_tokenize, jit=True)
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
    txt.set_defaults(run=cmd.data_tokenize_text)
    tr = commands.add_parser("train", help="train (or resume) the run a config describes")
    tr.add_argument(
        "config", metavar="CONFIG", help="YAML preset, e.g. configs/train/tiny_pretrain.yaml"
    )
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    tr.set_defaults(run=cmd.train, jit=True)
    comp = commands.add_parser(
        "compile", help="compile the train step for a TPU topology; print memory and FLOPs"
    )
    comp.add_argument("config", metavar="CONFIG", help="YAML preset, e.g. configs/lm/moshi_7b.yaml")
    comp.add_argument("--topology", required=True, help="v5p-128, v5e-16, v6e-64, v4-32, ...")
    comp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    comp.set_defaults(run=cmd.aot_compile)
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
    inf.set_defaults(run=cmd.infer, jit=True)
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
    srv.set_defaults(run=cmd.serve, jit=True)
    cht = commands.add_parser("chat", help="talk to a Moshi-protocol server with a WAV file")
    cht.add_argument("--url", default="ws://127.0.0.1:8998/api/chat", help="server's /api/chat")
    cht.add_argument("--wav", required=True, help="the user's audio")
    cht.add_argument("--channel", type=int, default=None, help="channel of a multi-channel file")
    cht.add_argument("--out", required=True, help="stereo WAV to write (model left, user right)")
    cht.add_argument("--fast", action="store_true", help="send as fast as possible, not live")
    cht.add_argument("--seed", type=int, default=None, help="the session's sampling seed")
    cht.add_argument("--token", default=None, help="the server's token, if it has one")
    cht.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a reply")
    cht.set_defaults(run=cmd.chat)
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
    exp.set_defaults(run=cmd.export)
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
    cod.set_defaults(run=cmd.eval_codec, jit=True)
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
    eal.set_defaults(run=cmd.eval_all, jit=True)
    elm = ev_cmds.add_parser("lm", help="spot-the-word, grammar pairs, spoken QA, perplexity")
    elm.add_argument("checkpoint", help="LM run or weights (with a stored config)")
    elm.add_argument("--codec", required=True, help="the codec the LM speaks through")
    elm.add_argument("--tokenizer", required=True, help="the LM's SentencePiece model")
    elm.add_argument("--out", required=True, help="folder for metrics.json, report.md, plots")
    elm.add_argument("--pairs", type=int, default=64, help="pairs per spoken test")
    elm.add_argument("--questions", type=int, default=24, help="spoken questions")
    elm.set_defaults(run=cmd.eval_lm, jit=True)
    dup = ev_cmds.add_parser("duplex", help="turn-taking (Full-Duplex-Bench v1 definitions)")
    dup.add_argument("--scored", help="score these conversations (`sfm data dialogues` layout)")
    dup.add_argument("--checkpoint", help="LM weights (a run): answer --dialogues through it")
    dup.add_argument("--config", help="lm preset or YAML (alone: random weights)")
    dup.add_argument("--codec", help="codec weights: sfm or Kyutai Mimi")
    dup.add_argument("--dialogues", help="held-out dialogues whose user channel the model hears")
    dup.add_argument("--out", required=True, help="folder for metrics.json, report.md, plots")
    dup.add_argument("--limit", type=int, help="at most this many dialogues")
    dup.add_argument("--slots", type=int, default=8, help="conversations run at once")
    dup.add_argument("--greedy", action="store_true", help="argmax instead of the run's sampling")
    dup.add_argument("--seed", type=int, default=0, help="sampling seed")
    dup.add_argument("--weights", default="float32", choices=WEIGHT_FORMATS, help="LM weights")
    dup.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    dup.set_defaults(run=cmd.eval_duplex, jit=True)


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
