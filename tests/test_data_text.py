"""Seeded text generation: reproducible, varied, and Q&A answers that check out."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfm.data.text import (
    CAPITALS,
    number_words,
    qa_pairs,
    read_text_file,
    sentences,
    words_number,
)


def test_sentences_reproducible_and_varied() -> None:
    a, b = sentences(200, seed=3), sentences(200, seed=3)
    assert a == b
    assert a != sentences(200, seed=4)
    assert len(set(a)) > 150
    assert any(s.endswith("?") for s in a) and any(s.endswith(".") for s in a)
    assert all(s[0].isupper() for s in a)


def test_number_words_roundtrip() -> None:
    assert number_words(12) == "twelve"
    assert number_words(112) == "one hundred and twelve"
    assert all(words_number(number_words(n)) == n for n in range(1000))


def test_qa_answers_are_correct() -> None:
    pairs = qa_pairs(400, seed=1)
    assert pairs == qa_pairs(400, seed=1)
    assert {p.kind for p in pairs} == {"arithmetic", "fact", "spelling", "yes_no"}
    for p in pairs:
        words = p.question.split()
        if p.kind == "arithmetic":
            op = next(w for w in ("plus", "minus", "times") if w in words)
            left, right = " ".join(words[2:]).split(f" {op} ")
            a, b = words_number(left), words_number(right)
            assert words_number(p.answer) == {"plus": a + b, "minus": a - b, "times": a * b}[op]
        elif p.kind == "spelling":
            assert p.answer.replace(" ", "") == words[-1]
        elif p.kind == "yes_no":
            left, right = " ".join(words[1:]).split(" than ")
            *left_words, relation = left.split()
            a, b = words_number(" ".join(left_words)), words_number(right)
            assert p.answer == ("yes" if (a > b if relation == "larger" else a < b) else "no")
        elif "capital" in p.question:
            assert CAPITALS[words[-1]] == p.answer


def test_read_text_file(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("First line.\n\n  Second   line.  \n")
    assert read_text_file(good) == ["First line.", "Second line."]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt.*no non-empty lines"):
        read_text_file(empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="bin.txt.*not UTF-8"):
        read_text_file(binary)
    with pytest.raises(ValueError, match="missing.txt"):
        read_text_file(tmp_path / "missing.txt")
