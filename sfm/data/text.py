"""Seeded English text: varied grammatical sentences and checkable question-answer pairs."""

from __future__ import annotations

import random
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _split(text: str) -> tuple[str, ...]:
    """Comma-separated phrases as a tuple."""
    return tuple(part.strip() for part in text.split(","))


def _table(text: str) -> dict[str, str]:
    """'key: value, key: value' as a dict."""
    return dict(tuple(p.split(": ")) for p in _split(text))


SINGULAR_SUBJECTS = _split(
    "the old farmer, my little sister, a tired teacher, the young doctor, our neighbour, "
    "the clever fox, a quiet student, the captain, my best friend, the baker, she, he"
)
PLURAL_SUBJECTS = _split(
    "the children, we, they, the two sailors, my parents, the musicians, a few tourists, "
    "the engineers"
)
SUBJECTS = tuple((s, False) for s in SINGULAR_SUBJECTS) + tuple((s, True) for s in PLURAL_SUBJECTS)
# Each verb: base form, third person singular, past tense.
VERBS = tuple(
    tuple(v.split())
    for v in _split(
        "find finds found, carry carries carried, paint paints painted, watch watches watched, "
        "open opens opened, clean cleans cleaned, build builds built, read reads read, "
        "sell sells sold, bring brings brought, fix fixes fixed, buy buys bought, "
        "borrow borrows borrowed, draw draws drew, hide hides hid"
    )
)
INTRANSITIVE = tuple(
    tuple(v.split())
    for v in _split(
        "sing sings sang, laugh laughs laughed, run runs ran, wait waits waited, "
        "dance dances danced, sleep sleeps slept, walk walks walked, swim swims swam, "
        "work works worked"
    )
)
OBJECTS = tuple(
    "box letter bicycle garden window map lamp basket book boat kite clock chair picture "
    "bottle ladder radio table".split()
)
ADJECTIVES = tuple(
    "red heavy broken small shiny wooden strange beautiful green ancient cheap soft empty "
    "bright tiny enormous yellow famous".split()
)
ADVERBS = tuple(
    "slowly quickly carefully happily quietly loudly early again gently proudly suddenly "
    "patiently".split()
)
PLACES = _split(
    "in the kitchen, near the river, behind the station, under the bridge, on the hill, "
    "at the market, inside the museum, across the street, beside the lake, in the garden, "
    "at the library, by the old church"
)
TIMES = _split(
    "yesterday, last night, this morning, every Sunday, after lunch, before dinner, "
    "on Monday, in the evening"
)
CAPITALS = _table(
    "france: paris, italy: rome, japan: tokyo, spain: madrid, germany: berlin, "
    "egypt: cairo, canada: ottawa, kenya: nairobi, peru: lima, norway: oslo, "
    "greece: athens, ireland: dublin"
)
COLOURS = _table(
    "the sky: blue, grass: green, snow: white, a banana: yellow, coal: black, "
    "a ripe tomato: red, an orange: orange, a lemon: yellow"
)
SOUNDS = _table(
    "a dog: woof, a cat: meow, a cow: moo, a duck: quack, a sheep: baa, a lion: roar, "
    "an owl: hoot, a snake: hiss"
)
SPELL_WORDS = tuple(
    "cat dog sun tree house apple water green happy river music bread stone cloud horse "
    "light".split()
)


@dataclass(frozen=True)
class QAPair:
    """A question, its one correct answer, and the kind of question it is."""

    question: str
    answer: str
    kind: str


def number_words(n: int) -> str:
    """`n` (0 to 999) written in English words: 42 -> 'forty two'."""
    if not 0 <= n < 1000:
        raise ValueError(f"number out of range 0..999: {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS[tens] + ("" if ones == 0 else " " + ONES[ones])
    hundreds, rest = divmod(n, 100)
    head = f"{ONES[hundreds]} hundred"
    return head if rest == 0 else f"{head} and {number_words(rest)}"


def words_number(text: str) -> int:
    """Inverse of `number_words`: 'forty two' -> 42."""
    total, current = 0, 0
    for word in text.split():
        if word == "and":
            continue
        if word == "hundred":
            current *= 100
        elif word in TENS:
            current += 10 * TENS.index(word)
        else:
            current += ONES.index(word)
    return total + current


def _subject(rng: random.Random) -> tuple[str, bool]:
    """A subject noun phrase and whether it is plural."""
    return rng.choice(SUBJECTS)


def _object(rng: random.Random) -> str:
    """An object noun phrase with an optional adjective."""
    noun = rng.choice(OBJECTS)
    if rng.random() < 0.6:
        adj = rng.choice(ADJECTIVES)
        return f"{'an' if adj[0] in 'aeiou' else 'a'} {adj} {noun}"
    return f"the {noun}"


def _verb(rng: random.Random, plural: bool, transitive: bool) -> tuple[str, str]:
    """A (present, past) verb pair agreeing with the subject."""
    base, third, past = rng.choice(VERBS if transitive else INTRANSITIVE)
    return (base if plural else third), past


def _statement(rng: random.Random) -> str:
    """A declarative sentence: subject, verb, optional object, adverb, place, time."""
    subject, plural = _subject(rng)
    transitive = rng.random() < 0.7
    present, past = _verb(rng, plural, transitive)
    parts = [subject, past if rng.random() < 0.5 else present]
    if transitive:
        parts.append(_object(rng))
    if rng.random() < 0.4:
        parts.append(rng.choice(ADVERBS))
    if rng.random() < 0.5:
        parts.append(rng.choice(PLACES))
    if rng.random() < 0.3:
        parts.append(rng.choice(TIMES))
    return " ".join(parts) + "."


def _question(rng: random.Random) -> str:
    """A yes/no or wh- question with do-support agreement."""
    subject, plural = _subject(rng)
    base, _, _ = rng.choice(VERBS)
    aux = rng.choice(("did", "do" if plural or subject == "they" else "does"))
    wh = rng.choice(("", "why ", "where ", "when "))
    tail = rng.choice(PLACES) if not wh and rng.random() < 0.5 else ""
    return " ".join(filter(None, [wh + aux, subject, base, _object(rng), tail])) + "?"


def _compound(rng: random.Random) -> str:
    """Two clauses joined by a conjunction."""
    first, second = _statement(rng)[:-1], _statement(rng)[:-1]
    return f"{first}, {rng.choice(('and', 'but', 'because', 'while'))} {second}."


def _capitalise(sentence: str) -> str:
    """Upper-case the first letter."""
    return sentence[:1].upper() + sentence[1:]


def sentences(n: int, seed: int) -> list[str]:
    """`n` varied grammatical English sentences; the same seed gives the same list."""
    rng = random.Random(seed)
    makers = (_statement, _statement, _question, _compound)
    return [_capitalise(rng.choice(makers)(rng)) for _ in range(n)]


def _arithmetic(rng: random.Random) -> QAPair:
    """'what is seven plus five' -> 'twelve' (also minus and times)."""
    op = rng.choice(("plus", "minus", "times"))
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if op == "minus":
        a, b = max(a, b), min(a, b)
    value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    question = f"what is {number_words(a)} {op} {number_words(b)}"
    return QAPair(question, number_words(value), "arithmetic")


def _fact(rng: random.Random) -> QAPair:
    """A capital, colour or animal-sound question from the built-in tables."""
    table = rng.choice(("capital", "colour", "sound"))
    if table == "capital":
        country, city = rng.choice(sorted(CAPITALS.items()))
        return QAPair(f"what is the capital of {country}", city, "fact")
    if table == "colour":
        thing, colour = rng.choice(sorted(COLOURS.items()))
        return QAPair(f"what colour is {thing}", colour, "fact")
    animal, sound = rng.choice(sorted(SOUNDS.items()))
    return QAPair(f"what sound does {animal} make", sound, "fact")


def _spelling(rng: random.Random) -> QAPair:
    """'how do you spell cat' -> 'c a t'."""
    word = rng.choice(SPELL_WORDS)
    return QAPair(f"how do you spell {word}", " ".join(word), "spelling")


def _yes_no(rng: random.Random) -> QAPair:
    """'is five larger than three' -> 'yes'."""
    a, b = rng.sample(range(21), 2)
    relation = rng.choice(("larger", "smaller"))
    truth = a > b if relation == "larger" else a < b
    question = f"is {number_words(a)} {relation} than {number_words(b)}"
    return QAPair(question, "yes" if truth else "no", "yes_no")


QA_MAKERS = (_arithmetic, _fact, _spelling, _yes_no)


def qa_pairs(n: int, seed: int) -> list[QAPair]:
    """`n` checkable question-answer pairs, numbers as words; reproducible from the seed."""
    rng = random.Random(seed)
    return [rng.choice(QA_MAKERS)(rng) for _ in range(n)]


def read_text_file(path: str | PathLike[str]) -> list[str]:
    """One sentence per non-empty line of a UTF-8 file; a clear ValueError if unusable."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ValueError(f"{p}: cannot read text file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text (bad byte at offset {e.start})") from None
    lines = [" ".join(line.split()) for line in text.splitlines()]
    kept = [line for line in lines if line]
    if not kept:
        raise ValueError(f"{p}: text file has no non-empty lines")
    return kept
