"""The documents eval.py measures on: generated fact documents and stories about fictional
people, places and numbers (seeded, no external data), a JSONL loader for your own
question-answering tasks, and evenly spaced token segments of your own long documents.

    doc = make_fact_doc(seed, n_tokens=512, n_facts=3, count=lambda s: len(tok.encode(s)))
    doc.text, [(f.question, f.answers, f.position) for f in doc.facts]
    make_story(seed, n_tokens)                          # for the language-modelling task
    load_tasks("mine.jsonl")                            # [{"context", "question", "answers", "line"}]
    document_segments(text, tok, n_tokens, n_segments)  # [[token ids], ...]
"""
import json
import random
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import UserError

SYLLABLES = ["ka", "lo", "ven", "dri", "mar", "tos", "el", "ra", "bek", "sun", "vi", "or", "tal", "ne",
             "gor", "fi", "zan", "mel", "quo", "rin", "dal", "pe", "shan", "tor", "ul", "brin", "ca", "mo"]
TOWN_ENDS = ["ford", "holm", "mere", "wick", "stead", "by", "gate", "moor"]
ORG_KINDS = ["Glassworks", "Observatory", "Rope Company", "Weaving Guild", "Lantern Society", "Clock Foundry"]
ANIMALS = ["cat", "dog", "goat", "parrot", "horse", "tortoise", "donkey", "owl"]
POSITIONS = ("beginning", "middle", "end")

# Filler: entity-free sentences (they start with a stop word of probes.ENTITY, no numbers).
F_SUBJECTS = ["the old road", "the market square", "the river", "the wind from the hills", "the schoolhouse",
              "the baker", "a traveller", "the fishing boat", "the town clock", "the library garden",
              "the ferry", "the evening bell", "the orchard", "the narrow lane", "the harbour wall"]
F_PREDICATES = ["was quiet for most of the day", "moved slowly under a grey sky", "seemed busier than usual",
                "was covered in a thin layer of frost", "smelled of bread and wood smoke",
                "carried the sound of distant music", "waited for the rain to stop",
                "turned golden in the late afternoon", "was talked about by everyone",
                "looked smaller than it had in summer", "stayed unchanged for many years",
                "was cleaned and painted again", "became a place where people met after work"]
F_TAILS = ["", "", " while the gulls circled overhead", " as the tide came in", " before anyone noticed",
           " and nobody minded", " during the long winter", " after the storm had passed"]


@dataclass
class Fact:
    sentence: str
    question: str
    answers: list[str]
    position: str = ""             # beginning | middle | end (set when placed in a document)


@dataclass
class FactDoc:
    seed: int
    text: str
    facts: list[Fact]
    n_tokens: int                  # by the `count` function the document was built with


class _Names:
    """Unique fictional names drawn from a seeded random generator."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def _word(self, n: int) -> str:
        while True:
            w = "".join(self.rng.choice(SYLLABLES) for _ in range(n)).capitalize()
            if w not in self.used and len(w) >= 4:
                self.used.add(w)
                return w

    def person(self) -> tuple[str, str]:
        first, last = self._word(2), self._word(3)
        return f"{first} {last}", last

    def town(self) -> str:
        return self._word(2) + self.rng.choice(TOWN_ENDS)

    def org(self) -> str:
        return f"{self._word(2)} {self.rng.choice(ORG_KINDS)}"

    def word(self) -> str:
        return self._word(2)


def _fact_birthplace(rng, names):
    (p, _), town = names.person(), names.town()
    return Fact(f"{p} was born in {town}.", f"In which town was {p} born?", [town])


def _fact_pet(rng, names):
    (p, _), pet, animal = names.person(), names.word(), rng.choice(ANIMALS)
    return Fact(f"{p} keeps a {animal} called {pet}.", f"What is the name of {p}'s {animal}?", [pet])


def _fact_founded(rng, names):
    org, year = names.org(), str(rng.randint(1700, 1990))
    return Fact(f"The {org} was founded in {year}.", f"In what year was the {org} founded?", [year])


def _fact_bridge(rng, names):
    town, n = names.town(), str(rng.randint(120, 980))
    return Fact(f"The bridge at {town} is {n} meters long.", f"How many meters long is the bridge at {town}?", [n])


def _fact_mayor(rng, names):
    town, (p, last) = names.town(), names.person()
    return Fact(f"The mayor of {town} is {p}.", f"Who is the mayor of {town}?", [p, last])


def _fact_boat(rng, names):
    (p, _), boat = names.person(), names.word()
    return Fact(f"{p} owns a boat named the {boat}.", f"What is the name of {p}'s boat?", [boat])


def _fact_password(rng, names):
    org, word = names.org(), names.word().lower()
    return Fact(f"The secret password of the {org} is {word}.", f"What is the secret password of the {org}?", [word])


FACT_TYPES = [_fact_birthplace, _fact_pet, _fact_founded, _fact_bridge, _fact_mayor, _fact_boat, _fact_password]


def filler_sentence(rng: random.Random) -> str:
    s = f"{rng.choice(F_SUBJECTS)} {rng.choice(F_PREDICATES)}{rng.choice(F_TAILS)}."
    return s[0].upper() + s[1:]


def filler_paragraph(rng: random.Random, n: Optional[int] = None) -> str:
    return " ".join(filler_sentence(rng) for _ in range(n or rng.randint(3, 5)))


def word_count(text: str) -> int:
    return len(text.split())


def make_fact_doc(seed: int, n_tokens: int, n_facts: int = 3, count: Callable[[str], int] = word_count) -> FactDoc:
    """A document of about n_tokens (by `count`, at least n_tokens) holding n_facts facts about
    fictional people, places and numbers, spread over the beginning, the middle and the end
    (positions cycle in that order), padded with entity-free filler paragraphs. Deterministic in
    seed; each fact's answer occurs in the text and nowhere else in the world."""
    rng = random.Random(seed)
    names = _Names(rng)
    kinds = rng.sample(FACT_TYPES, len(FACT_TYPES))
    facts = []
    for i in range(n_facts):
        f = kinds[i % len(kinds)](rng, names)
        f.position = POSITIONS[i % len(POSITIONS)]
        facts.append(f)

    def fact_paragraph(f: Fact) -> str:
        sents = [filler_sentence(rng) for _ in range(rng.randint(1, 3))]
        sents.insert(rng.randint(0, len(sents)), f.sentence)
        return " ".join(sents)

    placed = {pos: [fact_paragraph(f) for f in facts if f.position == pos] for pos in POSITIONS}
    body: list[str] = []

    def assemble() -> str:
        half = len(body) // 2
        return "\n\n".join(placed["beginning"] + body[:half] + placed["middle"] + body[half:] + placed["end"])

    text = assemble()
    while count(text) < n_tokens:
        body.append(filler_paragraph(rng))
        text = assemble()
    return FactDoc(seed, text, facts, count(text))


STORY_TEMPLATES = [
    "{a} walked to the market in {town} with {b}.", "{a} told {b} that the bridge at {town} was {n} meters long.",
    "In the evening {a} wrote a letter to {b}.", "{b} laughed when {a} mentioned the {org}.",
    "The {org} in {town} hired {a} for the summer.", "{a} and {b} argued about the price of fish.",
    "It was {b} who first noticed the lights over {town}.", "{a} kept a {animal} called {pet} at the {org}.",
    "{b} promised {a} to return before the festival.", "The letter from {a} reached {town} late.",
]


def make_story(seed: int, n_tokens: int, count: Callable[[str], int] = word_count) -> str:
    """A generated narrative with a small recurring cast (so the context matters for the next
    tokens), at least n_tokens long by `count`. Used for the language-modelling task when no
    --docs are given."""
    rng = random.Random(seed)
    names = _Names(rng)
    cast = [names.person()[0] for _ in range(4)]
    towns, orgs = [names.town() for _ in range(2)], [names.org() for _ in range(2)]
    pets = {p: (rng.choice(ANIMALS), names.word()) for p in cast}
    n = {t: rng.randint(120, 980) for t in towns}
    paras, text = [], ""
    while count(text) < n_tokens:
        sents = []
        for _ in range(rng.randint(3, 6)):
            a, b = rng.sample(cast, 2)
            town = rng.choice(towns)
            tmpl = rng.choice(STORY_TEMPLATES + ["{filler}"])
            sents.append(filler_sentence(rng) if tmpl == "{filler}" else tmpl.format(
                a=a, b=b, town=town, n=n[town], org=rng.choice(orgs), animal=pets[a][0], pet=pets[a][1]))
        paras.append(" ".join(sents))
        text = "\n\n".join(paras)
    return text


# ------------------------------------------------------------------------------------------
# Your own documents and tasks
# ------------------------------------------------------------------------------------------

class TaskFileError(UserError):
    """A malformed tasks file: one line, "<file>:<line>: <problem>"."""


def load_tasks(path) -> list[dict]:
    """Read a JSONL file of {"context", "question", "answer"} objects (answer: a string or a list
    of accepted strings; extra keys are kept). Blank lines are skipped. Any malformed line is a
    TaskFileError naming the file and the line number."""
    from .cli import read_text_file

    text = read_text_file(path)                      # one-line errors: missing, binary, not UTF-8, empty
    tasks = []
    for i, s in enumerate(text.split("\n"), 1):
        where = f"{path}:{i}"
        if not s.strip():
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise TaskFileError(f"{where}: expected a JSON object with context, question, answer")
        missing = [k for k in ("context", "question", "answer") if k not in obj]
        if missing:
            raise TaskFileError(f"{where}: missing key(s) {', '.join(missing)}")
        for k in ("context", "question"):
            if not isinstance(obj[k], str) or not obj[k].strip():
                raise TaskFileError(f"{where}: {k!r} must be a non-empty string")
        ans = obj["answer"]
        answers = [ans] if isinstance(ans, str) else ans
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise TaskFileError(f"{where}: 'answer' must be a non-empty string or a list of non-empty strings")
        tasks.append({**obj, "answers": answers, "line": i})
    if not tasks:
        raise TaskFileError(f"{path}: no tasks (the file has no JSON lines)")
    return tasks


def document_segments(text: str, tok, n_tokens: int, n_segments: int, name: str = "document") -> list[list[int]]:
    """n_segments token windows of n_tokens each, at evenly spaced places of a (long) text, each
    starting at a line start. Only the needed slices of the text are tokenized."""
    sample = text[len(text) // 2: len(text) // 2 + 4000] or text
    chars_per_tok = max(1.0, len(sample) / max(1, len(tok.encode(sample))))
    span = int(n_tokens * chars_per_tok * 1.25) + 200
    last = max(0, len(text) - span)
    starts = [last // 2] if n_segments == 1 else [round(k * last / (n_segments - 1)) for k in range(n_segments)]
    segs = []
    for s in starts:
        nl = text.rfind("\n", 0, s)
        s = nl + 1 if s > 0 and nl >= 0 else s
        width = span
        while True:
            ids = tok.encode(text[s:s + width])
            if len(ids) >= n_tokens or s + width >= len(text):
                break
            width = int(width * 1.5)
        if len(ids) < n_tokens:
            raise UserError(f"{name}: too short: {len(ids)} tokens from offset {s}, need {n_tokens} "
                            f"(--context + --eval-len); give a longer document or smaller sizes")
        segs.append(ids[:n_tokens])
    return segs


# ------------------------------------------------------------------------------------------
# Long documents: entries of one shape (a gazetteer), where facts interfere
# ------------------------------------------------------------------------------------------

PRODUCTS = ["blue glass", "smoked eel", "copper bells", "woollen shawls", "cherry wine", "salt", "rope",
            "clocks", "lace", "honey", "paper lanterns", "slate roofs"]


@dataclass
class Entry:
    text: str                      # one paragraph
    start: int                     # its character offset in the document
    facts: list[Fact]


@dataclass
class LongDoc:
    seed: int
    text: str
    entries: list[Entry]
    style: str


def _unused_number(rng: random.Random, names: _Names, lo: int, hi: int) -> str:
    """A number not used before in this document (so every answer occurs once)."""
    while True:
        v = str(rng.randint(lo, hi))
        if v not in names.used:
            names.used.add(v)
            return v


def _town_entry(rng: random.Random, names: _Names, style: str) -> tuple[str, list[Fact]]:
    town, river = names.town(), names.word()
    (founder, f_last), (mayor, m_last) = names.person(), names.person()
    year, length = _unused_number(rng, names, 1600, 1950), _unused_number(rng, names, 40, 990)
    product = rng.choice(PRODUCTS)
    facts = [Fact(f"{town} was founded in {year} by {founder}.", f"Who founded {town}?", [founder, f_last]),
             Fact(f"{town} is a town on the River {river}.", f"On which river is {town}?", [river]),
             Fact(f"The mayor of {town} is {mayor}.", f"Who is the mayor of {town}?", [mayor, m_last]),
             Fact(f"{town} was founded in {year}.", f"In what year was {town} founded?", [year]),
             Fact(f"The bridge of {town} is {length} meters long.", f"How many meters long is the bridge of {town}?",
                  [length])]
    sents = [f"{town} is a town on the River {river}.", f"It was founded in {year} by {founder}.",
             f"Its mayor is {mayor}.", f"The town is known for its {product}.",
             f"The bridge of {town} is {length} meters long."]
    if style == "prose":                           # the same facts, in varied order, among filler
        head, rest = sents[0], sents[1:]
        rng.shuffle(rest)
        sents = [head] + [s for r in rest for s in (r, filler_sentence(rng))][:-1]
    return " ".join(sents), facts


def make_long_doc(seed: int, n_tokens: int, count: Callable[[str], int] = word_count, style: str = "catalogue",
                  ) -> LongDoc:
    """A document of about n_tokens (by `count`, at least n_tokens): entries about fictional
    towns, one paragraph each, every entry of the same shape ("X is a town on the River Y. It was
    founded in YEAR by NAME. Its mayor is ..."), so facts of one entry can be given to another.
    style "catalogue": the entries alone; "prose": each entry's sentences shuffled among filler
    sentences. Deterministic in seed; every answer occurs once in the text."""
    if style not in ("catalogue", "prose"):
        raise ValueError(f"style must be catalogue or prose, not {style!r}")
    rng = random.Random(seed)
    names = _Names(rng)
    entries, text = [], ""
    while not entries or count(text) < n_tokens:
        body, facts = _town_entry(rng, names, style)
        start = len(text) + (2 if text else 0)
        text = f"{text}\n\n{body}" if text else body
        entries.append(Entry(body, start, facts))
    return LongDoc(seed, text, entries, style)


def long_questions(doc: LongDoc, n: int, seed: int = 0) -> list[tuple[Entry, Fact]]:
    """n (entry, fact) pairs spread evenly over the document, one fact per chosen entry."""
    rng = random.Random(seed)
    k = len(doc.entries)
    picks = sorted({round(i * (k - 1) / max(n - 1, 1)) for i in range(n)})
    return [(doc.entries[i], rng.choice(doc.entries[i].facts)) for i in picks]
