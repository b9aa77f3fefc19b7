"""SentencePiece text tokenizer whose id layout matches Moshi's text stream.

Id layout of a trained model (Moshi's own 32k model uses the same ids for the two pads):

    0  <epad>  end of padding (TEXT_EPAD), a control piece: never produced from text
    1  <s>     begin of sequence (unused by the text stream)
    2  <unk>   unknown; byte fallback makes it rare
    3  <pad>   padding (TEXT_PAD), never produced from text
    4+         text pieces (plus 256 byte pieces <0x00>..<0xFF> when vocab_size >= 1024)

There is no end-of-sequence piece. An existing model such as Moshi's
`tokenizer_spm_32k_3.model` is loaded as is and trusted to keep 0 and 3 for the pads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from sfm.data.audio import PathLike
from sfm.errors import SfmError
from sfm.lm.layout import TEXT_EPAD, TEXT_PAD

EPAD_PIECE = "<epad>"
MIN_BYTE_FALLBACK_VOCAB = 1024  # below this the 256 byte pieces would crowd out text


class TokenizerError(SfmError, ValueError):
    """A tokenizer that cannot be trained or loaded; the message names the file."""


def train_tokenizer(
    texts: Iterable[str],
    model_prefix: PathLike,
    vocab_size: int,
    model_type: str = "unigram",
) -> Path:
    """Train on `texts` and write `<model_prefix>.model` (and `.vocab`); returns the model path."""
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    lines = [t.strip() for t in texts if t.strip()]
    if not lines:
        raise TokenizerError(f"{prefix}: no text to train a tokenizer on")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        control_symbols=[EPAD_PIECE],  # takes the one free id below 4: 0
        bos_id=1,
        unk_id=2,
        pad_id=TEXT_PAD,
        eos_id=-1,
        byte_fallback=vocab_size >= MIN_BYTE_FALLBACK_VOCAB,
        hard_vocab_limit=False,  # small corpora: fewer pieces rather than an error
        character_coverage=1.0,
        minloglevel=2,
    )
    path = prefix.with_suffix(".model")
    _check_layout(load_tokenizer(path), path)
    return path


def _check_layout(sp: spm.SentencePieceProcessor, path: Path) -> None:
    """Fail unless EPAD and PAD are the reserved ids 0 and 3."""
    if sp.piece_to_id(EPAD_PIECE) != TEXT_EPAD or sp.pad_id() != TEXT_PAD:
        raise TokenizerError(f"{path}: {EPAD_PIECE} is not id 0 or <pad> is not id 3")


def load_tokenizer(path: PathLike) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model (ours or Moshi's: pads at 0 and 3 by convention)."""
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from e


def encode_word(sp: spm.SentencePieceProcessor, word: str) -> list[int]:
    """Token ids of one word, never the reserved pad ids."""
    return [i for i in sp.encode(word) if i not in (TEXT_EPAD, TEXT_PAD)]


def decode_stream(sp: spm.SentencePieceProcessor, tokens_t: Iterable[int]) -> str:
    """The words of a text stream: its pads, negative ids (frames without text) and the ids
    this tokenizer has no piece for are left out. (An LM's text vocabulary may be larger than its
    tokenizer: the quickstart's is 512 ids, a small corpus trains fewer pieces; the LM can
    still sample the ids it never saw.)"""
    size = sp.get_piece_size()
    ids = [int(t) for t in tokens_t]
    return sp.decode([t for t in ids if 0 <= t < size and t not in (TEXT_EPAD, TEXT_PAD)])


def corpus_words(corpus_dir: PathLike) -> Iterator[str]:
    """One line of text per alignment JSON under `corpus_dir` (words joined by spaces)."""
    for json_path in sorted(Path(corpus_dir).rglob("*.json")):
        try:
            rows = json.loads(json_path.read_text(encoding="utf-8")).get("alignments", [])
        except (OSError, ValueError, AttributeError):
            continue
        words = [r[0] for r in rows if isinstance(r, list) and r and isinstance(r[0], str)]
        if words:
            yield " ".join(words)


def training_texts(corpora: Sequence[PathLike], text_files: Sequence[PathLike]) -> Iterator[str]:
    """Lines from the corpora's alignments, then from plain text files."""
    for corpus in corpora:
        yield from corpus_words(corpus)
    for text_file in text_files:
        yield from Path(text_file).read_text(encoding="utf-8").splitlines()
