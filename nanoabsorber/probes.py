"""What Y is made of for chat models: probe conversations about the absorbed text.

Each probe is a user question plus an assistant answer. The teacher sees the document at the
start of the user message (P · X · Y with X = document + "\\n\\n"), the student the same chat
without it (P · Y). Probe kinds:
  recite   "Repeat the text above word for word." answered with the text itself
  entity   "What does the text say about {E}?" for names and numbers found in the text,
           answered with the sentences that mention E (copied from the text, no generation)
  cloze    "Complete the sentence from the text: The school is called ___." for every sentence
           and name/number in it, answered with the whole sentence (the forward direction a
           question takes: from the cue to the fact)
  continue 'Continue the text from "Its headmaster is":' answered with the rest of the paragraph
           (recitation that starts at every sentence)
  generic  "Summarize the text." and friends, answered by the teacher (generation, slower;
           bench/absorb_recipes.py only)
Passage probes (their teacher sees only the passage they are about, not the whole window; a
passage is a paragraph, or a run of at most PASSAGE_SENTS sentences of a longer one; its topic is
its first name):
  about    "What does the text say about {topic}?" answered with the passage: cue to facts,
           one probe per passage, so the probes of different windows do not compete for one
           question the way "Repeat the text above" does
  fact     "About {topic}, complete the sentence from the text: Its mayor is ___." answered
           with the sentence, for every name/number of every sentence but the topic (the cloze
           probe with its subject restored, where a sentence says "it" for the topic)
The default (absorber.DEFAULT_PROBES) is about + fact: with the hybrid loss they put 0.73 of a
catalogue window's facts within reach of a question where recite put 0.27, and 7/8 of the demo's
(README, "Long documents"). A chat (memory.py) uses recite.
"""
import re
from collections import Counter
from typing import Optional

SENT_RE = re.compile(r"[^.!?\n]+[.!?]?")
ENTITY_RE = re.compile(r"\b(?:[A-Z][a-z]+(?:[ -][A-Z][a-z]+)*|\d[\d,.]*\d|\d)\b")
STOP = {"The", "A", "An", "It", "Its", "He", "She", "They", "His", "Her", "Their", "This", "That", "These",
        "Those", "There", "Every", "When", "What", "Who", "In", "On", "At", "And", "But", "Or", "If", "As",
        "For", "With", "From", "By", "To", "Of", "I", "We", "You", "Mr", "Mrs", "Miss", "Chapter", "CHAPTER",
        "Then", "So", "Yes", "No", "Not", "One", "All", "Some", "After", "Before", "Once", "While"}
GENERIC = ["Summarize the text.", "What are the most important facts in the text?",
           "List the names, places and numbers mentioned in the text.", "What is the text about?"]
RECITE = "Repeat the text above word for word."


def blank(sent: str, e: str) -> str:
    """The sentence with its first whole-word occurrence of e replaced by ___."""
    return re.sub(rf"(?<!\w){re.escape(e)}(?!\w)", "___", sent, count=1)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENT_RE.findall(text) if len(s.strip()) > 3]


def entities(text: str, limit: int = 24) -> list[str]:
    """Names (runs of capitalised words, minus sentence-starting function words) and numbers,
    most frequent first, at most `limit`."""
    counts: Counter = Counter()
    for m in ENTITY_RE.finditer(text):
        e = m.group(0)
        words = e.split()
        while words and words[0] in STOP:
            words = words[1:]
        e = " ".join(words)
        if len(e) >= 2 or e.isdigit():
            counts[e] += 1
    return [e for e, _ in counts.most_common(limit)]


def entity_probes(text: str, limit: int = 24, max_chars: int = 400) -> list[tuple[str, str]]:
    sents = sentences(text)
    out = []
    for e in entities(text, limit):
        ans = " ".join(s for s in sents if e in s)[:max_chars]
        if ans:
            out.append((f"What does the text say about {e}?", ans))
    return out


def cloze_probes(text: str, limit: int = 48) -> list[tuple[str, str]]:
    ents = entities(text, 10 * limit)
    out = []
    for sent in sentences(text):
        # the names/numbers in the sentence, and its last long word (sentences tend to end on news)
        words = re.findall(r"[A-Za-z]{4,}", sent)
        blanks = [e for e in ents if e in sent] + [w for w in words[-1:] if not any(w in e for e in ents)]
        for e in blanks:
            b = blank(sent, e)
            if len(sent) > len(e) + 8 and "___" in b:
                out.append((f"Complete the sentence from the text: {b}", sent))
    return out[:limit]


def continue_probes(text: str, words: int = 4) -> list[tuple[str, str]]:
    """'Continue the text from "Its headmaster is": ' answered with the rest of that paragraph:
    recitation that starts at every sentence, not only at the top of the text."""
    out = []
    for para in [p for p in re.split(r"\n\s*\n", text) if p.strip()]:
        sents = sentences(para)
        for i, s in enumerate(sents):
            w = s.split()
            if len(w) > words + 2:
                rest = " ".join([" ".join(w[words:])] + sents[i + 1:])
                out.append((f'Continue the text from "{" ".join(w[:words])}".', rest))
    return out


PASSAGE_KINDS = ("about", "fact")
PASSAGE_SENTS = 12


def passage_spans(text: str, max_sents: int = PASSAGE_SENTS) -> list[tuple[int, str]]:
    """(start offset, passage) for the text's paragraphs, a longer one cut into runs of at most
    max_sents sentences (each run starts where its first sentence does)."""
    out = []
    for m in re.finditer(r"\S(?:.|\n(?!\s*\n))*", text):              # paragraphs: runs without a blank line
        sents = [(m.start() + s.start() + len(s.group(0)) - len(s.group(0).lstrip()), s.group(0).strip())
                 for s in SENT_RE.finditer(m.group(0)) if len(s.group(0).strip()) > 3]   # (start, sentence)
        if len(sents) <= max_sents:
            out.append((m.start(), m.group(0).strip()))
        else:
            out += [(sents[i][0], " ".join(t for _, t in sents[i:i + max_sents]))
                    for i in range(0, len(sents), max_sents)]
    return out


def passages(text: str, max_sents: int = PASSAGE_SENTS) -> list[str]:
    """The text's paragraphs, a longer one cut into runs of at most max_sents sentences."""
    return [psg for _, psg in passage_spans(text, max_sents)]


def topic(passage: str) -> Optional[str]:
    """A passage's first name or number (the thing an entry of a list or catalogue is about)."""
    for m in ENTITY_RE.finditer(passage):
        words = m.group(0).split()
        while words and words[0] in STOP:
            words = words[1:]
        if words and (len(" ".join(words)) >= 2 or words[0].isdigit()):
            return " ".join(words)
    return None


def about_probes(passage: str) -> list[tuple[str, str]]:
    t = topic(passage)
    return [(f"What does the text say about {t}?", passage.strip())] if t else []


def fact_probes(passage: str, limit: int = 24) -> list[tuple[str, str]]:
    t = topic(passage)
    if not t:
        return []
    out = []
    for sent in sentences(passage):
        ents = [e for e in entities(sent, 8) if e != t and e not in t]
        if not ents:                      # the sentence's last long word, as cloze does
            ents = [w for w in re.findall(r"[A-Za-z]{4,}", sent)[-1:] if w not in t]
        for e in ents:
            b = blank(sent, e)
            if len(sent) > len(e) + 8 and "___" in b:
                out.append((f"About {t}, complete the sentence from the text: {b}", sent))
    return out[:limit]


def passage_probes(text: str, kinds) -> list[tuple[int, str, list[tuple[str, str]]]]:
    """(start offset, passage, its probes) for the passage kinds among `kinds` (about, fact)."""
    kinds = set(kinds)
    out = []
    for start, psg in passage_spans(text):
        pr = (about_probes(psg) if "about" in kinds else []) + (fact_probes(psg) if "fact" in kinds else [])
        if pr:
            out.append((start, psg, pr))
    return out


def make_probes(text: str, kinds) -> list[tuple[str, str]]:
    """Probe (question, answer) pairs of the given window kinds (recite, entity, cloze, continue)
    for `text` (passage kinds: passage_probes)."""
    kinds = set(kinds)
    return (([recite_probe(text)] if "recite" in kinds else []) + (entity_probes(text) if "entity" in kinds else [])
            + (cloze_probes(text) if "cloze" in kinds else [])
            + (continue_probes(text) if "continue" in kinds else []))


def recite_probe(text: str) -> tuple[str, str]:
    return RECITE, text.strip()


def chat_probe_ids(tok, doc: str, probes: list[tuple[str, str]], system: Optional[str] = None):
    """Token ids (prefix P, context X, [Y_j]) for chat probes.
    P = chat header up to and including '<|im_start|>user\\n' (with the model's default system
    prompt), X = doc + '\\n\\n', Y_j = question + end-of-user + assistant header + answer + end."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "\x00"}]
    full = tok.apply_chat_template(msgs, add_generation_prompt=True)
    head, tail = full.split("\x00")                       # tail = '<|im_end|>\n<|im_start|>assistant\n'
    prefix = tok.encode(head, bos=tok.add_bos)
    x = tok.encode(doc.strip() + "\n\n")
    end = tok.special_tokens.get("<|im_end|>")
    ys = []
    for q, a in probes:
        y = tok.encode(q + tail + a)
        ys.append(y + ([end] if end is not None else ([tok.eos_id] if tok.eos_id is not None else [])))
    return prefix, x, ys, tail


def question_ids(tok, question: str, doc: Optional[str] = None, system: Optional[str] = None) -> list[int]:
    """The prompt for asking `question` (with the document in the user message when given), laid
    out exactly as the probes were: P · [doc + '\\n\\n'] · question + tail."""
    prefix, x, _, tail = chat_probe_ids(tok, doc or "", [], system)
    return prefix + (x if doc else []) + tok.encode(question + tail)


def answer(model, tok, question: str, doc: Optional[str] = None, max_tokens: int = 32) -> str:
    """Greedy answer to `question`, with the document in the prompt when `doc` is given."""
    from .sampling import greedy

    out = greedy(model, question_ids(tok, question, doc), max_tokens, tok.stop_ids)
    return tok.decode([t for t in out if t not in tok.stop_ids]).strip()
