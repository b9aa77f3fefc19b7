"""`sfm eval lm`: a speech-text LM scored the way its field scores one.

- **Spot-the-word** (as sWUGGY): a real word of the project's vocabulary against a pseudo-
  word made from it by changing one letter (a vowel for a vowel, a consonant for a consonant;
  never a word of pocketsphinx's 130k-word CMU dictionary), both spoken by the same voice.
  The model prefers the one whose audio it finds more likely. Chance: 0.5.
- **Grammar** (as sBLIMP): minimal pairs from the project's grammar (`sfm.data.text`) that
  differ in subject-verb agreement only ("the baker finds the map" / "the baker find the
  map"), spoken. Chance: 0.5.
- **Spoken QA**: held-out synthetic questions (`qa_pairs` with a seed of their own) spoken by
  a user voice into the engine; correct when the model's reply opens with the answer, read
  from its text stream, and (separately) from the ASR transcript of its audio. Chance:
  about 0 (open answers).
- **Text perplexity** of held-out written sentences and question-answer lines (the text
  stream alone).

A spoken item's likelihood is the model's log-probability of its audio tokens with an empty
text stream (TEXT_PAD, as in the pretraining's speech-only spans), summed over frames: over
the semantic codebook (the headline, as textless LMs score) and over every codebook.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfm.data import text as grammar
from sfm.data.synth import Voice, synthesize
from sfm.data.tokenizer import decode_stream
from sfm.errors import SfmError
from sfm.lm.layout import TEXT_PAD, StreamLayout, delay_streams, text_to_streams
from sfm.lm.loss import cross_entropy

VOWELS = set("aeiou")
CONSONANTS = set("bcdfghjklmnprstvwz")
BATCH = 16


@dataclass(frozen=True)
class Pair:
    """A well-formed item and its minimally different ill-formed twin."""

    good: str
    bad: str


@functools.cache
def lexicon() -> frozenset[str]:
    """The words of pocketsphinx's CMU pronouncing dictionary (alternates folded)."""
    from pathlib import Path

    import pocketsphinx

    path = Path(pocketsphinx.get_model_path()) / "en-us" / "cmudict-en-us.dict"
    return frozenset(line.split(" ", 1)[0].split("(")[0] for line in path.open())


def vocabulary() -> list[str]:
    """Single words the project's texts use (>= 4 letters, so one letter changed still
    leaves a pronounceable word-like string)."""
    words = {*grammar.OBJECTS, *grammar.ADJECTIVES, *grammar.ADVERBS, *grammar.SPELL_WORDS}
    words |= {v[0] for v in (*grammar.VERBS, *grammar.INTRANSITIVE)}
    return sorted(w for w in words if len(w) >= 4 and w.isalpha())


def pseudo_word(word: str, rng: random.Random) -> str:
    """`word` with one letter changed within its class, not a dictionary word."""
    for _ in range(200):
        i = rng.randrange(len(word))
        pool = VOWELS if word[i] in VOWELS else CONSONANTS
        if word[i] not in pool:
            continue
        candidate = word[:i] + rng.choice(sorted(pool - {word[i]})) + word[i + 1 :]
        if candidate not in lexicon():
            return candidate
    raise ValueError(f"no pseudo-word found for {word!r}")


def word_pairs(n: int, seed: int) -> list[Pair]:
    """`n` (word, pseudo-word) pairs, words cycled through the vocabulary."""
    rng = random.Random(seed)
    words = vocabulary()
    rng.shuffle(words)
    return [Pair(w, pseudo_word(w, rng)) for w in (words * (n // len(words) + 1))[:n]]


def grammar_pairs(n: int, seed: int) -> list[Pair]:
    """`n` agreement minimal pairs: subject + verb (agreeing / not) + object."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        subject, plural = rng.choice(grammar.SUBJECTS)
        base, third, _ = rng.choice(grammar.VERBS)
        good, bad = (base, third) if plural else (third, base)
        obj = f"the {rng.choice(grammar.OBJECTS)}"
        pairs.append(Pair(f"{subject} {good} {obj}.", f"{subject} {bad} {obj}."))
    return pairs


def _log_probs(model: Any, tokens_bst: jax.Array, mask_bst: jax.Array) -> tuple[jax.Array, ...]:
    """Per item: log-probability summed over masked positions of the text stream, of the
    semantic codebook and of every codebook."""
    out = model(tokens_bst)
    k = model.cfg.dep_q
    text_ce, _ = cross_entropy(out.text_logits, tokens_bst[:, 0])
    audio_ce, _ = cross_entropy(out.audio_logits, jnp.moveaxis(tokens_bst[:, 1 : 1 + k], 1, 2))
    audio_mask = jnp.moveaxis(mask_bst[:, 1 : 1 + k], 1, 2)
    return (
        -(text_ce * mask_bst[:, 0]).sum(-1),
        -(audio_ce[..., 0] * audio_mask[..., 0]).sum(-1),
        -(audio_ce * audio_mask).sum((1, 2)),
    )


class Scorer:
    """Log-likelihoods of spoken and written items under one LM, in padded batches."""

    def __init__(self, lm: Any, codec: Any, voice: Voice) -> None:
        from sfm.codec.files import streaming_codec, warm_up

        self.lm, self.voice = lm, voice
        self.layout: StreamLayout = lm.cfg.layout
        self.codec = streaming_codec(codec)
        warm_up(self.codec)
        self._score = nnx.jit(_log_probs)

    def _batched(self, items: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """[N, 3] log-probabilities (text, semantic, all codebooks) of undelayed items."""
        delayed = [delay_streams(t, m, self.layout) for t, m in items]
        length = -(-max(t.shape[1] for t, _ in delayed) // 8) * 8
        rows = []
        for i in range(0, len(delayed), BATCH):
            tokens = np.full((BATCH, self.layout.n_streams, length), self.layout.ignore, np.int32)
            mask = np.zeros(tokens.shape, bool)
            for j, (t, m) in enumerate(delayed[i : i + BATCH]):
                tokens[j, :, : t.shape[1]], mask[j, :, : m.shape[1]] = t, m
            out = jax.device_get(self._score(self.lm, jnp.asarray(tokens), jnp.asarray(mask)))
            rows.append(np.stack(out, axis=1)[: len(delayed[i : i + BATCH])])
        return np.concatenate(rows)

    def spoken(self, texts: Sequence[str]) -> np.ndarray:
        """[N, 2] log-likelihood of each text spoken by the voice: semantic, all codebooks."""
        from tqdm import tqdm

        from sfm.codec.files import encode_wav

        items = []
        for text in tqdm(texts, desc="spoken items", unit="item", leave=False):
            audio = synthesize(text, self.voice, self.codec.cfg.sample_rate).audio
            codes_kt = encode_wav(self.codec, audio)[: self.layout.n_q]
            tokens = np.full((self.layout.n_streams, codes_kt.shape[1]), self.layout.ignore)
            tokens[0], tokens[self.layout.model_audio] = TEXT_PAD, codes_kt
            mask = np.zeros(tokens.shape, bool)
            mask[self.layout.model_audio] = True
            items.append((tokens.astype(np.int32), mask))
        return self._batched(items)[:, 1:]

    def written(self, token_lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Log-likelihood of each token sequence on the text stream, and its token count."""
        items = [text_to_streams(np.asarray(t, np.int32), self.layout) for t in token_lists]
        counts = np.array([m[0].sum() for _, m in items])
        return self._batched(items)[:, 0], counts


def pair_accuracy(scorer: Scorer, pairs: Sequence[Pair]) -> dict[str, float]:
    """Share of pairs whose good item is more likely, by the semantic codebook and by all."""
    good = scorer.spoken([p.good for p in pairs])
    bad = scorer.spoken([p.bad for p in pairs])
    wins = good > bad
    return {"semantic": float(wins[:, 0].mean()), "all_codebooks": float(wins[:, 1].mean())}


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z ]+", " ", text.lower()).split())


def answered(answer: str, said: str) -> bool:
    """Whether the reply opens with the answer ("The answer is" first allowed, as the
    dialogues' assistant says it): a reply naming several candidates is not an answer."""
    reply = _words(said)
    reply = reply.removeprefix("the answer is ")
    return f"{reply} ".startswith(f"{_words(answer)} ")


def spoken_qa(
    engine: Any, sp: Any, qas: Sequence[grammar.QAPair], voice: Voice, listen_s: float = 5.0
) -> dict[str, Any]:
    """Ask each question (spoken by `voice`, then `listen_s` of silence) through the engine;
    accuracy by the model's text stream and by ASR of its audio."""
    from sfm.eval.speech import transcribe
    from sfm.infer.converse import converse_many
    from sfm.lm.layout import TEXT_EPAD

    rate = engine.sample_rate
    users = []
    for qa in qas:
        audio = synthesize(f"{qa.question.capitalize()}?", voice, rate).audio
        users.append(np.concatenate([audio, np.zeros(int(listen_s * rate), np.float32)]))
    talks = converse_many(engine, users, pad_ids=(TEXT_PAD, TEXT_EPAD))
    rows = []
    for qa, talk in zip(qas, talks):
        text = decode_stream(sp, [token for _, token, _ in talk.text])
        heard = transcribe(talk.stereo_tc[:, 0], rate)
        row = {"question": qa.question, "answer": qa.answer, "text": text, "asr": heard}
        rows.append(
            row | {"by_text": answered(qa.answer, text), "by_asr": answered(qa.answer, heard)}
        )
    return {
        "by_text": float(np.mean([r["by_text"] for r in rows])),
        "by_asr": float(np.mean([r["by_asr"] for r in rows])),
        "questions": len(rows),
        "rows": rows,
    }


def text_perplexity(scorer: Scorer, sp: Any, lines: Sequence[str]) -> dict[str, float]:
    """exp(mean negative log-likelihood per token) of the lines on the text stream."""
    token_lists = [sp.encode(line) for line in lines]
    log_probs, counts = scorer.written(token_lists)
    nll = -float(log_probs.sum()) / float(counts.sum())
    return {"perplexity": float(np.exp(nll)), "nats_per_token": nll, "tokens": int(counts.sum())}


def held_out_text(n: int, seed: int) -> list[str]:
    """Written lines the quickstart never trained on (seeds of their own)."""
    qa = [f"{p.question.capitalize()}? {p.answer.capitalize()}." for p in grammar.qa_pairs(n, seed)]
    return grammar.sentences(n, seed + 1) + qa


def eval_lm(
    checkpoint: str,
    codec_checkpoint: str,
    tokenizer: str,
    out: str,
    pairs: int = 64,
    questions: int = 24,
    seed: int = 1000,
    slots: int = 8,
) -> dict[str, Any]:
    """`sfm eval lm`: every measurement above on the LM of `checkpoint` (a run), speaking
    through `codec_checkpoint`; writes out/metrics.json and out/report.md."""
    if pairs < 1 or questions < 1:
        raise SfmError(f"eval lm: --pairs and --questions must be >= 1, got {pairs}, {questions}")
    import json
    from pathlib import Path

    from sfm.data.synth import voices
    from sfm.data.tokenizer import load_tokenizer
    from sfm.eval.report import write_lm_report
    from sfm.infer.converse import load_models
    from sfm.infer.engine import Engine

    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    codec, lm, cfg = load_models(checkpoint, None, codec_checkpoint)
    sp = load_tokenizer(tokenizer)
    assistant = voices("flite")[0]  # the clear voice the model speaks with
    user = voices("espeak")[seed % len(voices("espeak"))]
    scorer = Scorer(lm, codec, assistant)
    engine = Engine(codec, lm, slots, cfg.sampling, seed=seed)
    metrics = {
        "spot_the_word": {**pair_accuracy(scorer, word_pairs(pairs, seed)), "chance": 0.5},
        "grammar": {**pair_accuracy(scorer, grammar_pairs(pairs, seed + 1)), "chance": 0.5},
        "spoken_qa": {
            **spoken_qa(engine, sp, grammar.qa_pairs(questions, seed + 2), user),
            "chance": 0.0,
        },  # fmt: skip
        "text": text_perplexity(scorer, sp, held_out_text(pairs, seed + 3)),
        "pairs": pairs,
    }
    metrics["text"]["uniform_perplexity"] = float(sp.get_piece_size())
    (target / "metrics.json").write_text(json.dumps(metrics, indent=1))
    write_lm_report(target, metrics)
    return metrics


__all__ = [
    "Pair",
    "eval_lm",
    "Scorer",
    "answered",
    "grammar_pairs",
    "held_out_text",
    "lexicon",
    "pair_accuracy",
    "pseudo_word",
    "spoken_qa",
    "text_perplexity",
    "vocabulary",
    "word_pairs",
]
