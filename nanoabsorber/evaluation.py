"""Library side of eval.py: the methods compared, QA metrics, generated fact documents, the
JSONL task loader, the streaming language-modelling helpers, cost measurements in fresh
processes, environment capture, Markdown tables and plots.

Methods (same model, same LoRA, same optimizer steps for every absorbing method):
    full      the whole context in the window (upper bound)
    none      no context at all
    window    only the last W tokens of the context
    absorber  Absorber: hidden-state synchronisation, L1 over every layer (the paper)
    ntp       next-token prediction on the context itself (TTT / Temp-LoRA style)
    kl        logits-only distillation: KL(teacher || student) on next-token distributions
    hybrid    hidden-state (per-layer normalised L1) + KL
In the language-modelling task every absorbing method also keeps the last W tokens in its window
(absorbed + window, as a deployment would); in the question-answering tasks it answers with no
document in the prompt (the document lives only in the weights).
"""
from __future__ import annotations

import json
import math
import os
import platform
import random
import re
import string
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from .absorber import AbsorbConfig, absorb_chunk, chunk_windows
from .cli import UserError
from .cli import read_text_file as _read_text_file
from .metrics import target_logprobs

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    name: str                      # key used in flags, JSON and tables
    label: str                     # human-readable name for tables and plots
    kind: str                      # "full" | "none" | "window" | "absorb"
    overrides: dict = field(default_factory=dict)   # AbsorbConfig fields for kind "absorb"


METHODS = {m.name: m for m in [
    Method("full", "full context", "full"),
    Method("none", "no context", "none"),
    Method("window", "window (last W)", "window"),
    Method("absorber", "Absorber (L1 sync)", "absorb", {"objective": "sync", "loss": "l1"}),
    Method("ntp", "NTP (TTT)", "absorb", {"objective": "ntp"}),
    Method("kl", "logit KL", "absorb", {"objective": "sync", "loss": "kl"}),
    Method("hybrid", "hybrid L1+KL", "absorb", {"objective": "sync", "loss": "hybrid"}),
]}


def parse_methods(spec: str) -> list[Method]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise UserError(f"unknown method(s) {bad or spec!r}; choose from {', '.join(METHODS)}")
    return [METHODS[n] for n in METHODS if n in names]  # canonical order


def method_config(base: AbsorbConfig, m: Method) -> AbsorbConfig:
    return replace(base, **m.overrides)


def parse_ints(spec: str, flag: str) -> list[int]:
    try:
        vals = [int(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected a comma list of integers, got {spec!r}") from None
    if not vals or min(vals) <= 0:
        raise UserError(f"{flag}: expected positive integers, got {spec!r}")
    return vals


# ------------------------------------------------------------------------------------------
# Question-answering metrics (SQuAD-style normalisation)
# ------------------------------------------------------------------------------------------

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def first_line(s: str) -> str:
    for line in s.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(prediction: str, answers: list[str]) -> bool:
    """Strict: the first non-empty line of the prediction, normalised, equals an answer, normalised."""
    p = normalize_answer(first_line(prediction))
    return any(p == normalize_answer(a) for a in answers)


def lenient_match(prediction: str, answers: list[str]) -> bool:
    """Lenient: an answer occurs in the prediction, case-insensitively (probes.is_correct)."""
    from .probes import is_correct

    return is_correct(prediction, answers)


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: list[str]) -> float:
    """SQuAD token F1 of the whole prediction, best over the accepted answers."""
    p = normalize_answer(prediction).split()
    return max(_f1(p, normalize_answer(a).split()) for a in answers)


def qa_scores(prediction: str, answers: list[str]) -> dict:
    return {"lenient": float(lenient_match(prediction, answers)), "strict": float(exact_match(prediction, answers)),
            "f1": token_f1(prediction, answers)}


def mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else math.nan


# ------------------------------------------------------------------------------------------
# Generated documents: fictional people, places and numbers (no external data)
# ------------------------------------------------------------------------------------------

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
# Input files
# ------------------------------------------------------------------------------------------

class TaskFileError(UserError):
    """A malformed --tasks file: one line, "<file>:<line>: <problem>"."""


def read_text_file(path) -> str:
    return _read_text_file(path)


def load_tasks(path) -> list[dict]:
    """Read a JSONL file of {"context", "question", "answer"} objects (answer: a string or a list
    of accepted strings; extra keys are kept). Blank lines are skipped. Any malformed line is a
    TaskFileError naming the file and the line number."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TaskFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TaskFileError(f"{path}: is a directory, expected a .jsonl file") from None
    tasks = []
    for i, line in enumerate(raw.split(b"\n"), 1):
        where = f"{path}:{i}"
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError:
            raise TaskFileError(f"{where}: not UTF-8 text") from None
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
# Streaming language modelling
# ------------------------------------------------------------------------------------------

def absorb_dropped(model, ids: list[int], keep: int, cfg: AbsorbConfig, prefix: list[int] = (),
                   log: Optional[Callable[[dict], None]] = None) -> list:
    """Algorithm 2 over the text that has left a window of `keep` tokens: the X windows tile
    ids[:-keep] (cfg.chunk tokens each); each X's Y is the cfg.sync_len real tokens after it, so
    the last X is synchronised on text inside the kept window (never on anything later)."""
    n_drop = len(ids) - keep
    if n_drop <= 0:
        return []
    wins = chunk_windows(n_drop, cfg.chunk, cfg.sync_len)
    out = []
    for ci, (s, e, _) in enumerate(wins):
        y = list(ids[e:min(e + cfg.sync_len, len(ids))])
        groups = [(list(prefix), list(ids[s:e]), [y] if y else [])]
        cb = (lambda d, ci=ci: log({**d, "chunk": ci + 1, "chunks": len(wins)})) if log else None
        out.append(absorb_chunk(model, groups, cfg, cb))
    return out


def lm_logprobs(model, prefix: list[int], context: list[int], target: list[int]) -> torch.Tensor:
    """(len(target) - 1, V) log-probabilities of target[1:], whatever the context (target[0] is
    skipped for every method, since with no context and no BOS it has no prediction)."""
    logp = target_logprobs(model, prefix, context, target)
    return logp[-(len(target) - 1):]


def token_nlls(logp: torch.Tensor, target: list[int]) -> torch.Tensor:
    """Per-token NLL (nats) of the last len(logp) target tokens."""
    tgt = torch.tensor(list(target[len(target) - logp.shape[0]:]))
    return -logp.gather(1, tgt[:, None])[:, 0]


def token_kls(logp_ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(ref || other) of two aligned (N, V) log-probability tensors."""
    return (logp_ref.exp() * (logp_ref - logp)).sum(-1)


def bucket_means(values: list[float], n_buckets: int) -> tuple[list[float], list[int]]:
    """Means of `values` over n_buckets contiguous, near-equal buckets; also the bucket starts."""
    n = len(values)
    n_buckets = max(1, min(n_buckets, n))
    edges = [round(i * n / n_buckets) for i in range(n_buckets + 1)]
    return [sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:])], edges[:-1]


def recovered_fraction(nll_none: float, nll_full: float, nll_method: float) -> float:
    """(NLL_none - NLL_method) / (NLL_none - NLL_full): 1 = all of the context's effect kept."""
    gap = nll_none - nll_full
    return (nll_none - nll_method) / gap if abs(gap) > 1e-9 else math.nan


def lm_summary(segments: list, per_token: dict, methods: list) -> dict:
    """Per method: NLL over every evaluated token, perplexity, mean KL from the full-context
    model, fraction of the context effect recovered (references "full" and "none" in
    per_token) and absorption seconds per 1k tokens."""
    nll = {n: float(torch.cat(v).mean()) for n, v in per_token.items()}
    out = {}
    for m in methods:
        rows = [s["methods"][m.name] for s in segments]
        ab = [r["absorb"] for r in rows if r["absorb"]]
        secs, toks = sum(a["seconds"] for a in ab), sum(a["tokens"] for a in ab)
        out[m.name] = {"label": m.label, "nll": nll[m.name], "ppl": math.exp(nll[m.name]),
                       "kl": mean(r["kl"] for r in rows),
                       "recovered": recovered_fraction(nll["none"], nll["full"], nll[m.name]),
                       "absorb_seconds_per_1k_tokens": secs / toks * 1000 if toks else None}
    return out


def nll_by_position(per_token: dict, n_buckets: int) -> dict:
    """NLL against position after the context: per method, the per-token NLL averaged over
    segments, then over n_buckets contiguous buckets. Positions count target tokens after the
    context (1 = the second evaluated token, the first one every method predicts)."""
    out = {"nll": {}, "bucket_starts": [], "bucket_centers": []}
    for name, curves in per_token.items():
        curve = torch.stack(curves).mean(0).tolist()
        out["nll"][name], starts = bucket_means(curve, n_buckets)
        ends = starts[1:] + [len(curve)]
        out["bucket_starts"] = [s + 1 for s in starts]
        out["bucket_centers"] = [(s + e - 1) / 2 + 1 for s, e in zip(starts, ends)]
    return out


# ------------------------------------------------------------------------------------------
# Memory and cost (measured in fresh processes, so that nothing earlier pollutes the peak)
# ------------------------------------------------------------------------------------------

def rss_bytes() -> int:
    """Current resident set size (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """RSS high-water mark: VmHWM (resettable) on Linux, else getrusage's ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class PeakMemory:
    """Peak memory of a block of work: RSS high-water (CPU) or max_memory_allocated (CUDA),
    as total and as extra over the level when the block started."""

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")

    def __enter__(self):
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.hwm_reset = reset_peak_rss()
            self.start = rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = peak_rss_bytes()
        self.extra = max(0, self.peak - self.start)
        return False

    def as_dict(self) -> dict:
        return {"memory_kind": "cuda max_memory_allocated" if self.cuda else
                ("RSS high-water (VmHWM, reset)" if self.hwm_reset else "RSS high-water (ru_maxrss)"),
                "memory_start_bytes": self.start, "memory_peak_bytes": self.peak, "memory_extra_bytes": self.extra}


def kv_cache_bytes(cfg, n_tokens: int, element_size: int) -> int:
    """Bytes of keys + values for n_tokens over every layer."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * n_tokens * element_size


def _setup_worker(spec: dict):
    from . import load
    from .attention import set_attention_impl

    torch.set_num_threads(spec["threads"])
    set_attention_impl(spec.get("attn", "auto"))
    model, tok = load(spec["ckpt"], device=spec["device"], dtype=spec["dtype"])
    # a short forward first: it pages in every weight (loads may be memory-mapped, and untouched
    # pages are not resident yet) and initialises the math libraries, so that neither is
    # counted as memory or time of the measured work
    with torch.no_grad():
        model(torch.zeros((1, 8), dtype=torch.long, device=model.embed.weight.device))
    return model, tok


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def worker_absorb_cost(spec: dict) -> dict:
    """Absorb spec["text"] with spec["cfg"] (AbsorbConfig fields) and the given probes; report
    wall time and peak memory of the absorption alone."""
    from .absorber import absorb_text
    from .lora import apply_lora, reset_lora

    model, tok = _setup_worker(spec)
    apply_lora(model, spec["targets"], spec["rank"], spec["alpha"])
    reset_lora(model, spec["cfg"]["seed"])
    cfg = AbsorbConfig(**spec["cfg"])
    n_tokens = len(tok.encode(spec["text"]))
    with PeakMemory(spec["device"]) as mem:
        _sync(spec["device"])
        t0 = time.perf_counter()
        res = absorb_text(model, tok, spec["text"], cfg, probes=spec["probes"])
        _sync(spec["device"])
        secs = time.perf_counter() - t0
    steps = sum(r.steps for r in res)
    return {"tokens": n_tokens, "windows": len(res), "steps": steps, "seconds": secs,
            "seconds_per_1k_tokens": secs / n_tokens * 1000, "seconds_per_step": secs / max(steps, 1),
            **mem.as_dict()}


def worker_inference_cost(spec: dict) -> dict:
    """Prefill a context, then decode spec["decode_tokens"] tokens greedily; report per-token
    decode latency and peak memory. mode "full": the whole context in the KV cache; mode
    "absorbed": LoRA applied and merged, only the last `window` tokens in the KV cache."""
    from .lora import apply_lora, merge_lora
    from .sampling import generate

    model, _ = _setup_worker(spec)
    ids = spec["ids"]
    if spec["mode"] == "absorbed":
        apply_lora(model, spec["targets"], spec["rank"], spec["alpha"])
        merge_lora(model)
        ids = ids[-spec["window"]:]
    times = []
    with PeakMemory(spec["device"]) as mem:
        with torch.inference_mode():
            _sync(spec["device"])
            t = time.perf_counter()
            for _ in generate(model, ids, spec["decode_tokens"], 0.0, stop_ids=()):
                _sync(spec["device"])
                now = time.perf_counter()
                times.append(now - t)
                t = now
    decode = sorted(times[1:]) or times     # times[0] includes the prefill
    elt = model.embed.weight.element_size()
    return {"tokens_in_window": len(ids), "prefill_seconds": times[0], "decode_tokens": len(times) - 1,
            "decode_ms_per_token": 1000 * sum(decode) / len(decode),
            "decode_ms_per_token_median": 1000 * decode[len(decode) // 2],
            "kv_cache_bytes": kv_cache_bytes(model.cfg, len(ids) + spec["decode_tokens"], elt),
            **mem.as_dict()}


WORKERS = {"absorb": worker_absorb_cost, "inference": worker_inference_cost}


def worker_main() -> None:
    """Entry point of a measurement process: one JSON spec on stdin, one JSON line on stdout."""
    spec = json.loads(sys.stdin.read())
    out = WORKERS[spec["kind"]](spec)
    sys.stdout.write("\n@@result " + json.dumps(out) + "\n")


def run_isolated(spec: dict, timeout: Optional[float] = None) -> dict:
    """Run one measurement in a fresh Python process (same interpreter and package) and return
    its result; RuntimeError with the worker's last error line on failure."""
    paths = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, NANOABSORBER_QUIET="1", PYTHONPATH=os.pathsep.join(paths))
    cmd = [sys.executable, "-c", "from nanoabsorber.evaluation import worker_main; worker_main()"]
    p = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, env=env, timeout=timeout)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("@@result "):
            return json.loads(line[len("@@result "):])
    err = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    why = err[-1] if err else f"exit status {p.returncode}"
    raise RuntimeError(f"measurement process ({spec['kind']}) failed: {why}")


# ------------------------------------------------------------------------------------------
# Environment and output files
# ------------------------------------------------------------------------------------------

def _git(*args) -> Optional[str]:
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str, threads: int) -> dict:
    import numpy

    from . import __version__

    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
           "torch": torch.__version__, "numpy": numpy.__version__, "nanoabsorber": __version__,
           "git_commit": commit, "git_dirty": bool(dirty) if dirty is not None else None,
           "platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
           "cpu_count": os.cpu_count(), "torch_threads": threads, "device": device}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        import matplotlib

        env["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    return env


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _finite(o):
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def write_json(obj: dict, path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(obj), indent=1, default=_json_default))
    tmp.replace(path)
    return path


def fmt(x, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, spec)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def mib(b) -> Optional[float]:
    return None if b is None else b / 2 ** 20


# ------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)
# ------------------------------------------------------------------------------------------

STYLE = {"full": ("black", "-", "o"), "none": ("grey", ":", "x"), "window": ("tab:blue", "--", "s"),
         "absorber": ("tab:red", "-", "D"), "ntp": ("tab:green", "-", "^"), "kl": ("tab:purple", "-", "v"),
         "hybrid": ("tab:orange", "-", "P")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lm(position: dict, summary: dict, title: str, path) -> Path:
    """Left: per-token NLL against position after the context; right: fraction of the context
    effect recovered per method."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    x = position["bucket_centers"]
    for name, ys in position["nll"].items():
        c, ls, mk = STYLE.get(name, (None, "-", "o"))
        a.plot(x, ys, color=c, linestyle=ls, marker=mk, label=METHODS[name].label)
    a.set_xlabel("tokens after the end of the context (bucket centre)")
    a.set_ylabel("NLL (nats / token)")
    a.set_title("NLL on unseen text vs position")
    a.grid(alpha=0.3)
    names = [n for n in summary if METHODS[n].kind != "full"]
    vals = [summary[n]["recovered"] if summary[n]["recovered"] is not None else math.nan for n in names]
    lo = max(-1.0, min([v for v in vals if math.isfinite(v)] + [0.0]) - 0.1)    # clip far-negative bars
    bars = b.bar(range(len(names)), [max(v, lo) for v in vals], color=[STYLE.get(n, ("C0",))[0] for n in names])
    for bar, v in zip(bars, vals):
        if math.isfinite(v):
            y = max(v, lo)
            b.annotate(f"{v:.2f}" + (" (off scale)" if v < lo else ""), (bar.get_x() + bar.get_width() / 2, y),
                       xytext=(0, 3 if y >= 0 else -10), textcoords="offset points", ha="center", fontsize=7)
    b.set_ylim(lo, 1.15)
    b.axhline(1.0, color="black", linewidth=1, linestyle="--")
    b.axhline(0.0, color="grey", linewidth=1)
    b.set_xticks(range(len(names)))
    b.set_xticklabels([METHODS[n].label for n in names], rotation=30, ha="right", fontsize=8)
    b.set_ylabel("context effect recovered\n(NLL_none - NLL) / (NLL_none - NLL_full)")
    b.set_title("Recovered fraction (1 = full context)")
    fig.suptitle(title)
    _legend_below(fig, a)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _legend_below(fig, ax) -> None:
    """One legend for the figure, in a row under the panels (never over the data)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)


def plot_facts(by_length: dict, by_position: dict, title: str, path) -> Path:
    """Lenient accuracy against document length (left) and fact position (right)."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    k = len(by_length)
    all_x = set()
    for i, (name, pts) in enumerate(by_length.items()):
        c, ls, mk = STYLE.get(name, (None, "-", "o"))
        xs = sorted(int(x) for x in pts)
        all_x |= set(xs)
        jitter = 2 ** ((i - (k - 1) / 2) * 0.025)   # side by side, so equal points stay visible
        a.plot([x * jitter for x in xs], [pts[str(x)] for x in xs], color=c, linestyle=ls, marker=mk,
               label=METHODS[name].label)
    a.set_xscale("log", base=2)
    a.set_xticks(sorted(all_x))
    a.set_xticklabels([str(x) for x in sorted(all_x)])
    a.minorticks_off()
    a.set_xlabel("document length (tokens)")
    a.set_ylabel("accuracy (answer contained)")
    a.set_ylim(-0.05, 1.05)
    a.set_title("Fact recall vs document length")
    a.grid(alpha=0.3)
    names = list(by_position)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ys = [by_position[name].get(p, math.nan) for p in POSITIONS]
        b.bar([j + i * width for j in range(len(POSITIONS))], ys, width, color=STYLE.get(name, ("C0",))[0],
              label=METHODS[name].label)
    b.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(POSITIONS))])
    b.set_xticklabels(POSITIONS)
    b.set_xlabel("where the fact sits in the document")
    b.set_ylabel("accuracy (answer contained)")
    b.set_ylim(0, 1.05)
    b.set_title("Fact recall vs position")
    fig.suptitle(title)
    _legend_below(fig, a)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_cost(rows: list[dict], title: str, path) -> Path:
    """Peak inference memory (with the KV-cache size) and decode latency against context length,
    full context vs absorbed (window + merged adapter)."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode, color, label in (("full", "black", "full context (KV cache of everything)"),
                               ("absorbed", "tab:red", "absorbed (window W + merged adapter)")):
        pts = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["context_tokens"])
        if not pts:
            continue
        xs = [r["context_tokens"] for r in pts]
        a.plot(xs, [mib(r["memory_extra_bytes"]) for r in pts], color=color, marker="o", label=f"{label}: peak extra")
        a.plot(xs, [mib(r["kv_cache_bytes"]) for r in pts], color=color, linestyle="--", marker=".",
               label=f"{label}: KV cache")
        b.plot(xs, [r["decode_ms_per_token_median"] for r in pts], color=color, marker="o", label=label)
    xs = sorted({r["context_tokens"] for r in rows})
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a.set_ylabel("MiB over the loaded model")
    a.set_title("Inference memory (measured peak, and KV-cache bytes)")
    b.set_ylabel("decode latency (ms / token, median)")
    b.set_title("Per-token decode latency")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
