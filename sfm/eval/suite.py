"""`sfm eval all RUN`: the codec, speech-LM and turn-taking evaluations of one run, with a
summary report linking the three.

RUN is a folder laid out as the quickstart writes one: codec/codec.safetensors, the LM run
(duplex/, else pretrain/, else RUN itself holding lm.safetensors) and tokens/text.model;
any of them can be given instead. Held-out dialogues are made under OUT/heldout (seed 7, never
trained on) unless a folder of them is given.
"""

from __future__ import annotations

import dataclasses
import shutil
from os import PathLike
from pathlib import Path
from typing import Any

HELD_OUT_SEED = 7
HELD_OUT_DIALOGUES = 50
DIALOGUE_S = 17.0  # mean length of a synthetic dialogue


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """What the evaluations read from a run."""

    codec: Path
    lm: Path
    tokenizer: Path


def run_files(
    run: str | PathLike[str],
    codec: str | PathLike[str] | None = None,
    lm: str | PathLike[str] | None = None,
    tokenizer: str | PathLike[str] | None = None,
) -> RunFiles:
    """Find the codec, LM run and tokenizer of `run` (the ones given win); FileNotFoundError
    names what is missing."""
    root = Path(run)
    lm_run = next((p for p in (root / "duplex", root / "pretrain", root)
                   if (p / "lm.safetensors").is_file()), None)  # fmt: skip
    found = {
        "codec": Path(codec) if codec else root / "codec" / "codec.safetensors",
        "lm": Path(lm) if lm else lm_run,
        "tokenizer": Path(tokenizer) if tokenizer else root / "tokens" / "text.model",
    }
    for name, path in found.items():
        if path is None or not path.exists():
            raise FileNotFoundError(f"{run}: no {name} found (give --{name})")
    return RunFiles(**found)  # type: ignore[arg-type]


def held_out_dialogues(out: Path, count: int = HELD_OUT_DIALOGUES) -> Path:
    """At least `count` dialogues from the dialogue generator with a seed of their own."""
    from sfm.data.dialogues import synth_dialogues
    from sfm.eval.codec_eval import manifest_rows

    folder = out / "heldout"
    if manifest_rows(folder) < count:  # absent, or made for fewer: made again
        shutil.rmtree(folder, ignore_errors=True)
        minutes = count * DIALOGUE_S * 1.2 / 60
        print(synth_dialogues(folder, minutes, seed=HELD_OUT_SEED).line())
    return folder


def duplex_engine(files: RunFiles, slots: int = 8, seed: int = 0) -> Any:
    """The engine serving the run's LM through its codec, with the run's own sampling."""
    from sfm.infer.converse import load_models
    from sfm.infer.engine import Engine

    codec, lm, cfg = load_models(files.lm, None, files.codec)
    return Engine(codec, lm, slots, cfg.sampling, seed=seed)


def eval_all(
    run: str | PathLike[str],
    out: str | PathLike[str],
    files: RunFiles | None = None,
    dialogues: str | PathLike[str] | None = None,
    utterances: int = 24,
    dialogue_count: int = HELD_OUT_DIALOGUES,
    pairs: int = 64,
    questions: int = 24,
) -> dict[str, Any]:
    """Every evaluation of `run` into out/{codec,lm,duplex}; out/report.md links them."""
    from sfm.eval.codec_eval import default_sets, eval_codec
    from sfm.eval.duplex import converse_dialogues
    from sfm.eval.lm_eval import eval_lm
    from sfm.eval.report import codec_table, duplex_table, lm_table

    out = Path(out)
    files = files or run_files(run)
    sets = default_sets(out, utterances)
    codec = eval_codec(files.codec, out / "codec", sets, utterances)
    lm = eval_lm(
        str(files.lm), str(files.codec), str(files.tokenizer), str(out / "lm"), pairs, questions
    )
    held_out = Path(dialogues) if dialogues else held_out_dialogues(out, dialogue_count)
    duplex = converse_dialogues(duplex_engine(files), held_out, out / "duplex", dialogue_count)
    lines = [f"# Evaluation of {run}", "", f"codec {files.codec}, LM {files.lm}", ""]
    for set_name, result in codec.items():
        lines += [f"## Codec: {set_name}", "", *codec_table(result["rows"]), ""]
    lines += ["## Speech LM", "", *lm_table(lm), ""]
    lines += [f"## Turn-taking ({held_out}, {len(duplex['dialogues'])} dialogues)", ""]
    lines += [*duplex_table(duplex), ""]
    lines += ["Details and plots: codec/report.md, lm/report.md, duplex/report.md."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return {"codec": codec, "lm": lm, "duplex": duplex}


__all__ = [
    "RunFiles",
    "duplex_engine",
    "eval_all",
    "held_out_dialogues",
    "run_files",
]
