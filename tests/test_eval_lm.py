"""`sfm eval lm`: the test items are what they claim, and an item's likelihood is the
training loss's own cross-entropy (summed), however it is batched."""

from __future__ import annotations

import numpy as np
import pytest

from sfm.data import text as grammar
from sfm.data.synth import voices
from sfm.eval.lm_eval import (
    CONSONANTS,
    VOWELS,
    Scorer,
    answered,
    grammar_pairs,
    lexicon,
    pseudo_word,
    word_pairs,
)
from sfm.lm.layout import delay_streams, text_to_streams
from sfm.lm.loss import lm_loss


def test_pseudo_words_are_one_letter_from_a_word():
    pairs = word_pairs(40, seed=3)
    assert pairs == word_pairs(40, seed=3)  # reproducible
    for p in pairs:
        assert p.good in lexicon() and p.bad not in lexicon()
        diff = [(a, b) for a, b in zip(p.good, p.bad) if a != b]
        assert len(p.good) == len(p.bad) and len(diff) == 1, p
        (a, b), = diff  # fmt: skip
        assert (a in VOWELS and b in VOWELS) or (a in CONSONANTS and b in CONSONANTS), p
    assert pseudo_word("window", __import__("random").Random(0)) not in lexicon()


def test_grammar_pairs_differ_in_agreement_only():
    verbs = {v[0]: v[1] for v in grammar.VERBS}
    singular = set(grammar.SINGULAR_SUBJECTS)
    for p in grammar_pairs(30, seed=5):
        good, bad = p.good.split(), p.bad.split()
        diff = [i for i, (a, b) in enumerate(zip(good, bad)) if a != b]
        assert len(good) == len(bad) and len(diff) == 1, p
        verb = good[diff[0]]
        subject = " ".join(good[: diff[0]])
        third_person = verb in verbs.values()
        assert third_person == (subject in singular), p  # the good one agrees


@pytest.mark.parametrize(
    "answer, said, ok",
    [
        ("twelve", "The answer is twelve. It is easy.", True),
        ("twelve", "Twelve.", True),
        ("yes", "No yes", False),  # several candidates: not an answer
        ("c a t", "C a t.", True),
        ("forty two", "The answer is forty.", False),
        ("paris", "", False),
    ],
)
def test_answered(answer, said, ok):
    assert answered(answer, said) == ok


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    from sfm.infer.converse import load_models

    codec, lm, _ = load_models(config="tiny")
    return Scorer(lm, codec, voices("flite")[0])


def _item(scorer: Scorer, frames: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    layout = scorer.layout
    rng = np.random.default_rng(seed)
    tokens = np.full((layout.n_streams, frames), layout.ignore, np.int32)
    tokens[0] = 3
    tokens[layout.model_audio] = rng.integers(0, scorer.lm.cfg.card, (layout.n_q, frames))
    mask = np.zeros(tokens.shape, bool)
    mask[layout.model_audio] = True
    return tokens, mask


def test_spoken_likelihood_is_the_training_cross_entropy(scorer):
    tokens, mask = _item(scorer, 20, seed=0)
    longer = _item(scorer, 33, seed=1)
    alone = scorer._batched([(tokens, mask)])[0]
    batched = scorer._batched([longer, (tokens, mask)])[1]  # padded to the longer one
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-4)
    dt, dm = delay_streams(tokens, mask, scorer.layout)
    _, m = lm_loss(scorer.lm(dt[None]), dt[None], dm[None], scorer.lm.cfg)
    per_cb = [float(m[f"cb{k}_ce"] * m[f"cb{k}_count"]) for k in range(scorer.lm.cfg.dep_q)]
    assert -alone[1] == pytest.approx(per_cb[0], rel=1e-5)
    assert -alone[2] == pytest.approx(sum(per_cb), rel=1e-5)
    assert alone[0] == 0.0  # no text target on a spoken item


def test_written_likelihood_is_the_training_cross_entropy(scorer):
    lines = [[5, 9, 17, 4, 30], [8, 2, 11]]
    log_probs, counts = scorer.written(lines)
    assert counts.tolist() == [5, 3]
    for tokens_t, lp in zip(lines, log_probs):
        t, m = delay_streams(*text_to_streams(np.asarray(tokens_t), scorer.layout), scorer.layout)
        _, metrics = lm_loss(scorer.lm(t[None]), t[None], m[None], scorer.lm.cfg)
        expected = float(metrics["text_ce"] * metrics["text_count"])
        assert -lp == pytest.approx(expected, rel=1e-5)


def test_spoken_items_are_scored(scorer):
    scores = scorer.spoken(["window", "wundow"])
    assert scores.shape == (2, 2) and np.isfinite(scores).all() and (scores < 0).all()
