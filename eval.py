"""Does absorption work? Absorber against its baselines, on the same model, LoRA and step budget.

    python eval.py --quick                                      # < 10 min on 2 CPU cores
    python eval.py --quick --docs ../shared/data/austen/emma.txt --out docs/results
    python eval.py --docs book1.txt book2.txt --tasks mine.jsonl --out results/
    python eval.py --only cost --cost-lengths 1024,2048,4096,8192

Methods: full context (upper bound), no context, window (only the last W tokens), Absorber
(hidden-state sync, L1), Absorber with per-layer normalised L1, NTP absorption (TTT / Temp-LoRA
style), logits-only KL distillation, hybrid hidden-state + KL. Select with --methods.

Sections (--only lm,facts,tasks,cost):
  lm     the paper's own test: each --docs file (default: a generated story) gives segments of
         C context tokens (--context) then E unseen tokens (--eval-len). full = E after all of C;
         none = E alone; window = E after the last W tokens of C (--window, 0 allowed); absorbing
         methods absorb the first C - W tokens (the text that left the window; Y = the real text
         after each absorbed window, then teacher-sampled continuations; never E) and score E
         after the same last W tokens. Reports per document and overall: NLL per token, KL from
         the full-context model, recovered = 1 - KL / KL_none (with 95% bootstrap intervals over
         segments), the per-layer hidden-state distance to the full-context model on E (plot
         lm_layers.png), and NLL against position after the context (lm_nll_position.png).
  facts  generated documents about fictional people, places and numbers (seeded; --fact-lengths
         tokens, facts at the beginning, middle and end); absorbing methods answer with no
         document in the prompt. Lenient (answer contained), strict (first line equals the
         answer, SQuAD-normalised) and token F1.
  tasks  your own JSONL file (--tasks): one {"context", "question", "answer"} object per line;
         exact match, token F1 and lenient match.
  cost   absorption wall time per 1k tokens and peak memory; inference peak memory, KV-cache
         bytes and per-token decode latency against context length, full context (KV cache of
         the whole context) vs absorbed (window W + merged adapter). Each point is measured in a
         fresh process.
Writes OUT/results.json (all numbers, configuration, versions), OUT/results.md (the tables, also
printed on stdout) and PNG plots in OUT.
"""
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from nanoabsorber import load
from nanoabsorber.absorber import (AUTOMATIC, PROBE_STEPS, RAW_STEPS, AbsorbConfig, absorb_stream, absorb_text,
                                   chunk_windows, resolve_config)
from nanoabsorber.benchdocs import (POSITIONS, document_segments, load_tasks, long_questions, make_fact_doc, make_long_doc,
                                    make_story)
from nanoabsorber.cli import RunConfig, check_ckpt, check_output_path, format_duration, read_text_file, run, setup
from nanoabsorber.config import (ConfigError, Parser, add_flags, build, comma_list, flag_name, folder_or_new,
                                 non_negative, positive, print_config, setting, validate)
from nanoabsorber.cost import PeakMemory, environment, run_isolated
from nanoabsorber.errors import UserError
from nanoabsorber.io import atomic_write_text
from nanoabsorber.lora import apply_lora, reset_lora
from nanoabsorber.metrics import (bootstrap_ci, continuation_scores, layer_distances, lm_logprobs, mean, nll_by_position,
                                  qa_scores, recovered, recovered_kl, target_hidden, token_nlls)
from nanoabsorber.probes import answer, question_ids

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
    Method("l1_norm", "Absorber (per-layer norm. L1)", "absorb", {"objective": "sync", "loss": "l1_norm"}),
    Method("hybrid", "hybrid L1+KL", "absorb", {"objective": "sync", "loss": "hybrid"}),
]}


# the long section's references: each question asked with part of the document in the prompt
LONG_REFS = [Method("full", "document in the prompt", "full"),
             Method("oracle_window", "oracle window", "oracle_window"),
             Method("oracle_passage", "oracle passage", "oracle_passage"),
             Method("last_window", "last window only", "last_window")]


def names(spec: str) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()]


def selected_methods(spec: str) -> list[Method]:
    """The methods of a comma list, in the canonical order of METHODS."""
    return [m for n, m in METHODS.items() if n in names(spec)]


def method_config(base: AbsorbConfig, m: Method) -> AbsorbConfig:
    return replace(base, **m.overrides)


# ------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------

SECTIONS = ("lm", "facts", "long", "tasks", "cost")
_RECIPE_DEFAULTS = AbsorbConfig()
# Sizes: a setting left at None takes the preset's value (--quick or full); an explicit flag wins.
PRESETS = {
    "full": dict(context=2048, eval_len=512, window=256, lm_segments=2, steps=None,
                 batch_tokens=_RECIPE_DEFAULTS.batch_tokens, fact_lengths="256,512,1024", facts_per_doc=6,
                 fact_docs=2, cost_lengths="1024,2048,4096,8192", cost_tokens=1024, cost_steps=PROBE_STEPS,
                 decode_tokens=32, answer_tokens=32, long_lengths="2048,4096,8192", long_styles="catalogue,prose",
                 long_docs=1, long_questions=12),
    "quick": dict(context=1024, eval_len=256, window=128, lm_segments=1, steps=10, batch_tokens=128,
                  fact_lengths="128,512", facts_per_doc=3, fact_docs=1, cost_lengths="1024,2048,4096",
                  cost_tokens=256, cost_steps=1, decode_tokens=32, answer_tokens=16, long_lengths="768",
                  long_styles="catalogue", long_docs=1, long_questions=6),
}


def ints(spec: str) -> list[int]:
    return [int(s) for s in spec.split(",") if s.strip()]


def positive_ints(v: str) -> Optional[str]:
    try:
        vals = ints(v)
    except ValueError:
        return f"expected a comma list of integers, not {v!r}"
    return None if vals and min(vals) > 0 else f"expected positive integers, not {v!r}"


def sized(key: str, help: str, check=positive):
    """A size setting whose default is the preset's (PRESETS, with or without --quick)."""
    return setting(None, f"{help} (automatic: {PRESETS['full'][key]}; with --quick: {PRESETS['quick'][key]})",
                   check=check)


@dataclass
class EvalConfig:
    """What eval.py measures and how big (the model settings are a RunConfig, the absorption recipe
    an AbsorbConfig)."""
    quick: bool = setting(False, "small sizes and few steps: under 10 minutes on 2 CPU cores")
    only: Optional[str] = setting(None, "comma list of sections to run: lm,facts,long,tasks,cost (automatic: all; tasks "
                                  "only when --tasks is given)", check=comma_list(SECTIONS, empty_ok=False))
    methods: str = setting(",".join(METHODS), "comma list of methods", check=comma_list(METHODS, empty_ok=False))
    out: str = setting("eval_out", "output folder for results.json, results.md and the plots", check=folder_or_new)
    docs: Optional[tuple] = setting(None, "long UTF-8 text files for the lm and cost sections (automatic: a "
                                    "generated story)")
    tasks: Optional[str] = setting(None, 'JSONL file of {"context", "question", "answer"} for the tasks section')
    tasks_limit: int = setting(0, "use only the first N tasks (0 = all)", check=non_negative)
    context: Optional[int] = sized("context", "lm: context tokens C before the evaluated span")
    eval_len: Optional[int] = sized("eval_len", "lm: evaluated tokens E after the context (never trained on)")
    window: Optional[int] = sized("window", "W: tokens kept in the attention window by the window and absorbing "
                                  "methods (0: none; the absorbed model then sees only the evaluated text)",
                                  check=non_negative)
    lm_segments: Optional[int] = sized("lm_segments", "lm: segments (C + E tokens) per document")
    buckets: int = setting(8, "lm: position buckets for NLL vs position", check=positive)
    fact_lengths: Optional[str] = sized("fact_lengths", "facts: document lengths in tokens, comma list",
                                        check=positive_ints)
    facts_per_doc: Optional[int] = sized("facts_per_doc", "facts: facts per document (beginning/middle/end in turn)")
    fact_docs: Optional[int] = sized("fact_docs", "facts: documents per length")
    answer_tokens: Optional[int] = sized("answer_tokens", "max tokens of a generated answer")
    long_lengths: Optional[str] = sized("long_lengths", "long: document lengths in tokens, comma list",
                                        check=positive_ints)
    long_styles: Optional[str] = sized("long_styles", "long: catalogue (entries alone, one shape) and/or prose "
                                       "(entry sentences among filler)", check=comma_list(("catalogue", "prose"),
                                                                                        empty_ok=False))
    long_docs: Optional[int] = sized("long_docs", "long: documents per length and style (fresh ones each --seed)")
    long_questions: Optional[int] = sized("long_questions", "long: questions per document, spread over it")
    long_refs: str = setting(",".join(m.name for m in LONG_REFS), "long: the reference contexts the questions are "
                             "also asked with ('' for none: absorbing methods only, for tuning runs)",
                             check=comma_list([m.name for m in LONG_REFS]))
    cost_lengths: Optional[str] = sized("cost_lengths", "cost: context lengths for inference memory/latency, comma "
                                        "list", check=positive_ints)
    cost_tokens: Optional[int] = sized("cost_tokens", "cost: tokens absorbed for the absorption measurement")
    cost_steps: Optional[int] = sized("cost_steps", "cost: optimizer steps for the absorption measurement",
                                      check=non_negative)
    decode_tokens: Optional[int] = sized("decode_tokens", "cost: tokens decoded per latency measurement")
    steps: Optional[int] = setting(None, f"optimizer steps per absorbed window (automatic: the recipe's, "
                                   f"{RAW_STEPS} for raw-text Y (lm), {PROBE_STEPS} with chat probes (facts, long, "
                                   f"tasks); with --quick: {PRESETS['quick']['steps']})", check=non_negative)
    batch_tokens: Optional[int] = sized("batch_tokens", "Y tokens per optimizer step (0 = all)", check=non_negative)

    def __post_init__(self):
        validate(self)
        if self.only and "tasks" in names(self.only) and not self.tasks:
            raise ConfigError("only", "the tasks section needs --tasks FILE.jsonl")
        if self.window is not None and self.context is not None and self.window >= self.context:
            raise ConfigError("window", f"must be smaller than --context ({self.context}), not {self.window}")

    def sized(self) -> "EvalConfig":
        """This config with the preset's sizes where none were given, and the sections resolved."""
        preset = PRESETS["quick" if self.quick else "full"]
        only = self.only or ",".join(s for s in SECTIONS if s != "tasks" or self.tasks)
        return replace(self, only=only, **{k: v for k, v in preset.items() if getattr(self, k) is None})

    def sections(self) -> list[str]:
        return [s for s in SECTIONS if s in names(self.only or "")]


RECIPE_SKIP = ("objective", "loss", "steps", "batch_tokens")   # set per method / by the preset


def build_parser() -> Parser:
    p = Parser(prog="eval.py", description=__doc__)
    add_flags(p, RunConfig, title="model")
    add_flags(p, EvalConfig, skip=("docs",), title="evaluation")
    p.add_argument("--docs", nargs="+", default=None, help=EvalConfig.__dataclass_fields__["docs"].metadata["help"])
    add_flags(p, AbsorbConfig, skip=RECIPE_SKIP,
              title="absorption recipe (every absorbing method; --methods sets the objective and loss)")
    return p


def parse(p: Parser, argv=None) -> tuple[RunConfig, EvalConfig, AbsorbConfig]:
    """The three configurations from the command line; a bad value or combination is one line
    through p.error (exit status 2)."""
    ns = p.parse_args(argv)
    run_cfg = build(p, RunConfig, ns)
    cfg = build(p, EvalConfig, ns, skip=("docs",))
    base = build(p, AbsorbConfig, ns, skip=RECIPE_SKIP)
    try:
        cfg = replace(cfg, docs=tuple(ns.docs) if ns.docs else None).sized()
    except ConfigError as e:
        p.error(f"argument {flag_name(e.name)}: {e.problem}")
    return run_cfg, cfg, replace(base, steps=cfg.steps, batch_tokens=cfg.batch_tokens)


def read_inputs(p: Parser, run_cfg: RunConfig, cfg: EvalConfig) -> tuple[list, list]:
    """([(path, text)] of --docs, the --tasks list), read before the slow model load; a missing or
    malformed file is one line through p.error."""
    try:
        check_ckpt(run_cfg)
        check_output_path(Path(cfg.out) / "results.json", "results")
        doc_texts = [(path, read_text_file(path)) for path in cfg.docs or ()]
        tasks = load_tasks(cfg.tasks)[:cfg.tasks_limit or None] if cfg.tasks else []
    except UserError as e:
        p.error(str(e))
    return doc_texts, tasks


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def step_logger(tag: str, steps: int):
    """Progress lines during absorption: the first step, every 5th and the last."""
    t0 = time.time()

    def log(d):
        if d["step"] in (1, steps) or d["step"] % 5 == 0:
            say(f"  {tag} window {d['chunk']}/{d['chunks']} step {d['step']}/{steps} loss {d['loss']:.4f} "
                f"({time.time() - t0:.0f}s)")
    return log


def auto_text(base: AbsorbConfig, key: str, spec: str = "") -> str:
    """A recipe setting as the report states it: its value, or both automatic values."""
    v = getattr(base, key)
    if v is not None:
        return format(v, spec)
    probe, raw = AUTOMATIC[key]
    return f"{format(raw, spec)} (lm, raw-text Y) / {format(probe, spec)} (QA sections, chat probes)"


def lr_text(base: AbsorbConfig) -> str:
    return auto_text(base, "lr", "g")


def steps_text(base: AbsorbConfig) -> str:
    return auto_text(base, "steps")


# ------------------------------------------------------------------------------------------
# Streaming language modelling
# ------------------------------------------------------------------------------------------

def lm_documents(tok, cfg: EvalConfig, seed: int, doc_texts: list) -> list:
    """[(name, [segment ids, ...])]: from the --docs texts, or one generated story."""
    n = cfg.context + cfg.eval_len
    if doc_texts:
        return [(Path(p).name, document_segments(text, tok, n, cfg.lm_segments, p)) for p, text in doc_texts]
    count = lambda s: len(tok.encode(s))  # noqa: E731
    segs = [tok.encode(make_story(seed + k, n + 64, count))[:n] for k in range(cfg.lm_segments)]
    return [("generated story", segs)]


def tail(ids: list, n: int) -> list:
    """The last n items (none for n = 0, unlike ids[-0:])."""
    return list(ids[len(ids) - n:]) if n > 0 else []


def absorb_dropped(model, ids: list[int], keep: int, cfg: AbsorbConfig, prefix: list[int] = (), stop_ids=(),
                   log: Optional[Callable[[dict], None]] = None) -> list:
    """Algorithm 2 over the text that has left a window of `keep` tokens: the X windows tile
    ids[:-keep] (cfg.chunk tokens each); each X's Y is the cfg.sync_len real tokens after it (for
    the last X: the kept window, then teacher-generated continuations, absorber.window_groups),
    so nothing after `ids` is ever trained on. keep = 0 absorbs all of ids."""
    if len(ids) - keep <= 0:
        return []
    return absorb_stream(model, ids, cfg, list(prefix), stop_ids, log, end=len(ids) - keep)


def lm_segment(model, prefix: list, ids: list, cfg: EvalConfig, base: AbsorbConfig, methods,
               stop_ids=()) -> tuple[dict, dict]:
    """Score one segment (C context tokens, then E evaluated ones) with every method:
    ({method: {"nll", "kl", "layers", "absorb"}}, {name: per-token NLL tensor}), the references
    "full" and "none" always included (the recovered fractions need them). "layers": the relative
    L1 distance of the method's hidden states to the full-context model's on the evaluated
    tokens, per layer (metrics.layer_distances)."""
    C, W = cfg.context, cfg.window
    ctx, target = ids[:C], ids[C:]
    reset_lora(model, base.seed)
    refs = {"full": lm_logprobs(model, prefix, ctx, target), "none": lm_logprobs(model, prefix, [], target)}
    # hidden states from the second evaluated token on: with nothing before it, the first one is
    # the attention sink (states far larger than anywhere else), not comparable with the full model's
    h_full = target_hidden(model, prefix, ctx, target)[:, 1:]
    dist = lambda c: layer_distances(h_full, target_hidden(model, prefix, c, target)[:, 1:])  # noqa: E731
    nlls = {k: token_nlls(v, target) for k, v in refs.items()}
    ref_scores = continuation_scores(refs, target)
    scores = {k: {"nll": ref_scores[k]["nll"], "kl": ref_scores[k]["kl"], "absorb": None,
                  "layers": [0.0] * len(h_full) if k == "full" else dist([])}    # full: its own reference
              for k in refs}
    for m in methods:
        if m.kind in refs:
            continue
        reset_lora(model, base.seed)
        t0, absorbed = time.time(), None
        if m.kind == "absorb":
            mcfg = method_config(base, m).resolved(chat_probes=False)     # raw-text Y
            res = absorb_dropped(model, ctx, W, mcfg, prefix, stop_ids, step_logger(f"[lm] {m.name}", mcfg.steps))
            absorbed = {"tokens": C - W, "windows": len(res), "steps": sum(r.steps for r in res),
                        "y_tokens": sum(r.y_tokens for r in res), "seconds": time.time() - t0,
                        "first_loss": res[0].first_loss, "final_loss": res[-1].final_loss}
        logp = lm_logprobs(model, prefix, tail(ctx, W), target)   # window, or absorbed + window
        nlls[m.name] = token_nlls(logp, target)
        s = continuation_scores({**refs, m.name: logp}, target)[m.name]
        scores[m.name] = {"nll": s["nll"], "kl": s["kl"], "absorb": absorbed,
                          "layers": dist(tail(ctx, W))}
    for m in methods:
        s = scores[m.name]
        say(f"[lm]   {m.label:22s} NLL {s['nll']:.4f}  KL {s['kl']:.4f}  recovered "
            f"{recovered_kl(scores['none']['kl'], s['kl']):.3f}"
            + (f"  (absorbed {C - W} tokens in {s['absorb']['seconds']:.0f}s)" if s["absorb"] else ""))
    return scores, nlls


def lm_summary(segments: list, methods: list, seed: int = 0) -> dict:
    """Per method over the segments: mean NLL and KL from the full-context model, the recovered
    fraction 1 - KL / KL_none (the paper's test; a ratio of segment means) and the NLL-based one,
    each with a 95% bootstrap interval over segments; the mean per-layer hidden distance to the
    full-context model; absorption seconds per 1k tokens."""
    def col(name, key):
        return [s["methods"][name][key] for s in segments]

    kl_none = col("none", "kl")
    nll_none, nll_full = col("none", "nll"), col("full", "nll")
    out = {}
    for m in methods:
        nl, k = col(m.name, "nll"), col(m.name, "kl")
        rows = list(zip(nl, k, kl_none, nll_none, nll_full))
        rec = lambda r: recovered_kl(mean(x[2] for x in r), mean(x[1] for x in r))  # noqa: E731
        rec_nll = lambda r: recovered(mean(x[3] for x in r), mean(x[4] for x in r), mean(x[0] for x in r))  # noqa
        ab = [a for a in col(m.name, "absorb") if a]
        secs, toks = sum(a["seconds"] for a in ab), sum(a["tokens"] for a in ab)
        layers = torch.tensor(col(m.name, "layers")).mean(0).tolist()
        out[m.name] = {"label": m.label, "segments": len(rows), "nll": mean(nl), "ppl": math.exp(mean(nl)),
                       "nll_ci": bootstrap_ci(rows, lambda r: mean(x[0] for x in r), seed=seed),
                       "kl": mean(k), "kl_ci": bootstrap_ci(rows, lambda r: mean(x[1] for x in r), seed=seed),
                       "recovered": rec(rows), "recovered_ci": bootstrap_ci(rows, rec, seed=seed),
                       "recovered_nll": rec_nll(rows), "recovered_nll_ci": bootstrap_ci(rows, rec_nll, seed=seed),
                       "layers": layers, "absorb_seconds_per_1k_tokens": secs / toks * 1000 if toks else None}
    return out


def run_lm(model, tok, cfg: EvalConfig, base: AbsorbConfig, methods, doc_texts: list) -> dict:
    prefix = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    if len(prefix) + cfg.context + cfg.eval_len > model.cfg.max_seq_len:
        raise UserError(f"--context + --eval-len = {cfg.context + cfg.eval_len} exceeds the model's "
                        f"{model.cfg.max_seq_len}-token context")
    segments, per_token = [], {}        # per_token[name]: one (E-1,) NLL tensor per segment
    docs = lm_documents(tok, cfg, base.seed, doc_texts)
    total, t0 = sum(len(s) for _, s in docs), time.time()
    for name, segs in docs:
        for si, ids in enumerate(segs):
            done = len(segments)
            eta = f", ETA {format_duration((time.time() - t0) / done * (total - done))}" if done else ""
            say(f"[lm] {name} segment {si + 1}/{len(segs)} ({done + 1}/{total}{eta}): context {cfg.context}, "
                f"window {cfg.window}, evaluated {len(ids) - cfg.context} tokens")
            scores, nlls = lm_segment(model, prefix, ids, cfg, base, methods, tok.stop_ids)
            for k, v in nlls.items():
                per_token.setdefault(k, []).append(v)
            segments.append({"document": name, "segment": si, "methods": scores})
    reset_lora(model, base.seed)
    by_doc = {name: lm_summary([s for s in segments if s["document"] == name], methods, base.seed)
              for name, _ in docs}
    return {"documents": [{"name": n, "segments": len(s)} for n, s in docs], "segments": segments,
            "summary": lm_summary(segments, methods, base.seed), "by_document": by_doc,
            "position": nll_by_position({m.name: per_token[m.name] for m in methods}, cfg.buckets)}


# ------------------------------------------------------------------------------------------
# Question answering (facts and tasks share this)
# ------------------------------------------------------------------------------------------

def answer_all(model, tok, items: list, methods, base: AbsorbConfig, cfg: EvalConfig, tag: str) -> list:
    """items: [{"context": str, "questions": [{"question", "answers", ...meta}], ...meta}].
    Every method answers every question; absorbing methods absorb each context first (fresh LoRA)
    and answer without it. Returns one row per (item, question, method)."""
    rows = []
    for ii, item in enumerate(items):
        ctx = item["context"]
        ctx_ids = tok.encode(ctx)
        say(f"[{tag}] document {ii + 1}/{len(items)}: {len(ctx_ids)} tokens, {len(item['questions'])} question(s)")
        for m in methods:
            reset_lora(model, base.seed)
            absorbed = None
            fresh = {}                      # question index -> scores right after its window was absorbed
            if m.kind == "absorb":
                absorbed = absorb_item(model, tok, item, method_config(base, m), cfg, f"[{tag}] {m.name}", fresh)
            doc = {"full": ctx, "window": tok.decode(tail(ctx_ids, cfg.window)), "last_window": item.get("last_window")}
            item_meta = {k: v for k, v in item.items() if k not in ("context", "questions", "last_window")}
            for qi, q in enumerate(item["questions"]):
                meta = {k: v for k, v in q.items() if k not in ("question", "answers") and not k.startswith("oracle")}
                rows.append({"item": ii, "method": m.name, "question": q["question"], "answers": q["answers"],
                             "context_tokens": len(ctx_ids), "absorb": absorbed, **meta, **item_meta,
                             **({"fresh": fresh[qi]} if qi in fresh else {}),
                             **answer_scored(model, tok, q, q.get(m.kind, doc.get(m.kind)), cfg.answer_tokens)})
            got = [r for r in rows if r["item"] == ii and r["method"] == m.name and r.get("prediction") is not None]
            say(f"[{tag}]   {m.label:22s} correct {sum(r['lenient'] for r in got):.0f}/{len(got)} (lenient)"
                + (f"  (absorbed in {absorbed['seconds']:.0f}s)" if absorbed else ""))
    reset_lora(model, base.seed)
    return rows


def absorb_item(model, tok, item: dict, mcfg: AbsorbConfig, cfg: EvalConfig, tag: str, fresh: dict) -> dict:
    """Absorb an item's context (the model's LoRA is fresh); where its questions know their
    window ("window" key: the long section), each is also answered right after its window is
    absorbed, into `fresh`, so retention can be compared with the answer after the last window.
    Returns the cost: tokens, windows, steps, seconds, peak memory over the loaded model."""
    qs, answering = item["questions"], [0.0]

    def on_window(ci, _res):
        t = time.time()
        mine = [qi for qi, q in enumerate(qs) if q.get("window") == ci]
        for qi in mine:
            fresh[qi] = answer_scored(model, tok, qs[qi], None, cfg.answer_tokens)
        answering[0] += time.time() - t
        if mine:   # in the log as it happens: a run stopped early still shows what each window held
            say(f"{tag} window {ci + 1}: right after it {sum(fresh[qi].get('lenient', 0) for qi in mine):.0f}/"
                f"{len(mine)} correct ({t - t0:.0f}s)")
    t0 = time.time()
    with PeakMemory(str(model.embed.weight.device)) as mem:
        res = absorb_text(model, tok, item["context"], mcfg, log=step_logger(tag, resolve_config(tok, mcfg).steps),
                          on_window=on_window if any("window" in q for q in qs) else None)
    secs = time.time() - t0 - answering[0]               # the absorption alone
    return {"tokens": len(tok.encode(item["context"])), "windows": len(res), "steps": sum(r.steps for r in res),
            "seconds": secs, "memory_extra_bytes": mem.extra}


def answer_scored(model, tok, q: dict, doc: Optional[str], max_tokens: int) -> dict:
    """One question answered (doc in the prompt, or none) and scored: {"prediction", "lenient",
    "strict", "f1"}, or prediction None and "skipped" when the prompt does not fit the model."""
    if len(question_ids(tok, q["question"], doc)) + max_tokens > model.cfg.max_seq_len:
        return {"prediction": None, "skipped": "prompt longer than the model's context"}
    with torch.no_grad():
        pred = answer(model, tok, q["question"], doc=doc, max_tokens=max_tokens)
    return {"prediction": pred, **qa_scores(pred, q["answers"])}


def qa_summary(rows: list, methods, by: tuple = ()) -> dict:
    """Mean lenient/strict/F1 per method, and lenient accuracy grouped by each key in `by`."""
    out = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m.name and r.get("prediction") is not None]
        ab = {(r["item"]): r["absorb"] for r in mine if r["absorb"]}
        toks, secs = sum(a["tokens"] for a in ab.values()), sum(a["seconds"] for a in ab.values())
        s = {"label": m.label, "n": len(mine), "skipped": sum(1 for r in rows if r["method"] == m.name) - len(mine),
             "lenient": mean(r["lenient"] for r in mine), "strict": mean(r["strict"] for r in mine),
             "f1": mean(r["f1"] for r in mine),
             "absorb_seconds_per_1k_tokens": secs / toks * 1000 if toks else None}
        for key in by:
            groups = sorted({r[key] for r in mine}, key=lambda v: (isinstance(v, str), v))
            s[f"by_{key}"] = {str(g): mean(r["lenient"] for r in mine if r[key] == g) for g in groups}
        out[m.name] = s
    return out


def run_facts(model, tok, cfg: EvalConfig, base: AbsorbConfig, methods) -> dict:
    count = lambda s: len(tok.encode(s))  # noqa: E731
    items = []
    for li, length in enumerate(ints(cfg.fact_lengths)):
        for k in range(cfg.fact_docs):
            doc = make_fact_doc(base.seed * 1000 + 100 * li + k, length, cfg.facts_per_doc, count)
            items.append({"context": doc.text, "length": length, "seed": doc.seed,
                          "questions": [{"question": f.question, "answers": f.answers, "position": f.position}
                                        for f in doc.facts]})
    rows = answer_all(model, tok, items, methods, base, cfg, "facts")
    return {"documents": [{"length": it["length"], "seed": it["seed"], "tokens": count(it["context"]),
                           "text": it["context"]} for it in items],
            "rows": rows, "summary": qa_summary(rows, methods, by=("length", "position"))}


def long_items(tok, cfg: EvalConfig, base: AbsorbConfig) -> list[dict]:
    """Generated long documents (fresh for each --seed), each question tagged with the window
    (Algorithm 2's, at --chunk / --sync-len) and the third of the document that hold its answer,
    and with its oracle window and passage."""
    count = lambda t: len(tok.encode(t))  # noqa: E731
    items = []
    for li, length in enumerate(ints(cfg.long_lengths)):
        for si, style in enumerate(names(cfg.long_styles)):
            for k in range(cfg.long_docs):
                seed = 7_000_000 + base.seed * 10_000 + 100 * li + 10 * si + k
                doc = make_long_doc(seed, length, count, style)
                ids = tok.encode(doc.text)
                wins = chunk_windows(len(ids), base.chunk, base.sync_len)
                qs = []
                for entry, fact in long_questions(doc, cfg.long_questions, seed):
                    at = count(doc.text[:entry.start + entry.text.find(fact.answers[0])])   # token offset
                    w = next(i for i, (a, e, _) in enumerate(wins) if at < e or i == len(wins) - 1)
                    qs.append({"question": fact.question, "answers": fact.answers, "window": w,
                               "third": POSITIONS[min(2, 3 * at // len(ids))],
                               "oracle_window": tok.decode(ids[wins[w][0]:wins[w][1]]), "oracle_passage": entry.text})
                items.append({"context": doc.text, "length": length, "style": style, "seed": seed,
                              "windows": len(wins), "last_window": tok.decode(ids[wins[-1][0]:wins[-1][1]]),
                              "questions": qs})
    return items


def long_summary(rows: list, methods) -> dict:
    """Per method: recall (answer in the first answer tokens), first-sentence recall, recall per
    third and per window, retention (recall right after the answer's window was absorbed, and
    after the last window), absorption seconds per 1k tokens and peak memory over the model."""
    out = qa_summary(rows, methods, by=("third", "window", "length", "style"))
    for m in methods:
        mine = [r for r in rows if r["method"] == m.name and r.get("prediction") is not None]
        out[m.name]["sentence"] = mean(r["sentence"] for r in mine)
        fresh = [r for r in mine if r.get("fresh", {}).get("prediction") is not None]
        if fresh:
            out[m.name]["retention"] = {"right_after_its_window": mean(r["fresh"]["lenient"] for r in fresh),
                                        "after_the_last_window": mean(r["lenient"] for r in fresh),
                                        "window_1_right_after": mean(r["fresh"]["lenient"] for r in fresh
                                                                     if r["window"] == 0),
                                        "window_1_after_the_last": mean(r["lenient"] for r in fresh
                                                                        if r["window"] == 0)}
        mem = [r["absorb"]["memory_extra_bytes"] for r in mine if r["absorb"]]
        out[m.name]["absorb_peak_extra_bytes"] = max(mem) if mem else None
    return out


def run_long(model, tok, cfg: EvalConfig, base: AbsorbConfig, methods) -> dict:
    # one set of windows for every method (the questions know theirs): the chat-probe recipe's
    rc = resolve_config(tok, replace(base, objective="sync"))
    base = replace(base, chunk=rc.chunk, sync_len=rc.sync_len)
    items = long_items(tok, cfg, base)
    long_methods = [m for m in LONG_REFS if m.name in names(cfg.long_refs)] + [m for m in methods if m.kind == "absorb"]
    rows = answer_all(model, tok, items, long_methods, base, cfg, "long")
    return {"documents": [{k: it[k] for k in ("length", "style", "seed", "windows")} | {"text": it["context"]}
                          for it in items],
            "methods": [m.name for m in long_methods], "rows": rows, "summary": long_summary(rows, long_methods),
            "chunk": base.chunk, "sync_len": base.sync_len}


def run_tasks(model, tok, cfg: EvalConfig, base: AbsorbConfig, methods, tasks: list) -> dict:
    items = [{"context": t["context"], "line": t["line"],
              "questions": [{"question": t["question"], "answers": t["answers"]}]} for t in tasks]
    rows = answer_all(model, tok, items, methods, base, cfg, "tasks")
    return {"file": str(cfg.tasks), "n_tasks": len(tasks), "rows": rows, "summary": qa_summary(rows, methods)}


# ------------------------------------------------------------------------------------------
# Cost
# ------------------------------------------------------------------------------------------

def cost_text_ids(tok, n: int, seed: int, doc_texts: list) -> list:
    """n tokens of realistic text: the first --docs file, else a generated story."""
    if doc_texts:
        path, text = doc_texts[0]
        return document_segments(text, tok, n, 1, path)[0]
    ids = tok.encode(make_story(seed + 1, n + 64, lambda s: len(tok.encode(s))))
    return ids[:n]


def _repeat(ids: list, n: int) -> list:
    return (ids * (n // max(1, len(ids)) + 1))[:n]


def cost_absorb(tok, cfg: EvalConfig, base: AbsorbConfig, methods, run_spec: dict, doc_texts: list) -> list:
    """Absorption wall time and peak memory of each absorbing method, each in a fresh process."""
    rows = []
    text = tok.decode(cost_text_ids(tok, cfg.cost_tokens, base.seed, doc_texts))
    for m in [m for m in methods if m.kind == "absorb"]:
        # the recipe's own Y batch (absorb.py's), so that the peak is the same at every step
        mcfg = replace(method_config(base, m), steps=cfg.cost_steps, batch_tokens=_RECIPE_DEFAULTS.batch_tokens)
        say(f"[cost] absorbing {cfg.cost_tokens} tokens with {m.label}, {mcfg.steps} steps (fresh process) ...")
        r = run_isolated({"kind": "absorb", "run": run_spec, "cfg": asdict(mcfg), "text": text})
        rows.append({"method": m.name, "label": m.label, **r})
        say(f"[cost]   {r['seconds']:.1f}s ({r['seconds_per_1k_tokens']:.1f}s per 1k tokens), peak "
            f"{mib(r['memory_peak_bytes']):.0f} MiB, +{mib(r['memory_extra_bytes']):.0f} MiB over the loaded model")
    return rows


def cost_inference(tok, cfg: EvalConfig, base: AbsorbConfig, lengths: list, run_spec: dict, doc_texts: list) -> list:
    """Decode latency and peak memory at each context length, full context vs absorbed (window
    + merged adapter), each in a fresh process."""
    top = max(lengths)
    seed = base.seed
    ids = cost_text_ids(tok, top, seed, doc_texts) if doc_texts else _repeat(cost_text_ids(tok, 2048, seed, []), top)
    rows = []
    for L in lengths:
        for mode in ("full", "absorbed"):
            window = max(1, min(cfg.window, L))   # the absorbed model decodes after at least one token
            say(f"[cost] inference, context {L} tokens, {mode}" + (f" (window {window})" if mode == "absorbed" else "")
                + f": decode {cfg.decode_tokens} tokens (fresh process) ...")
            r = run_isolated({"kind": "inference", "run": run_spec, "lora": asdict(base.lora), "mode": mode,
                              "ids": ids[:L], "window": window, "decode_tokens": cfg.decode_tokens})
            rows.append({"context_tokens": L, "mode": mode, **r})
            say(f"[cost]   KV cache {mib(r['kv_cache_bytes']):.1f} MiB, peak +{mib(r['memory_extra_bytes']):.0f} MiB, "
                f"prefill {r['prefill_seconds']:.2f}s, decode {r['decode_ms_per_token_median']:.1f} ms/token (median)")
    return rows


def run_cost(model, tok, cfg: EvalConfig, base: AbsorbConfig, methods, run_cfg: RunConfig, doc_texts: list) -> dict:
    # the measurement processes use this process's model settings and thread count
    run_spec = asdict(replace(run_cfg, threads=torch.get_num_threads()))
    absorb_rows = cost_absorb(tok, cfg, base, methods, run_spec, doc_texts)
    notes = []
    wanted = ints(cfg.cost_lengths)
    limit = model.cfg.max_seq_len - cfg.decode_tokens
    lengths = sorted({min(L, limit) for L in wanted})
    if max(wanted) > limit:
        notes.append(f"context lengths above {limit} (model context {model.cfg.max_seq_len} minus "
                     f"{cfg.decode_tokens} decoded tokens) were measured at {limit}")
    if cfg.quick and max(wanted) < 8192:
        notes.append("--quick: the 8k-token point is dropped (prefill of 8k tokens is slow on CPU); "
                     "run without --quick or with --cost-lengths 1024,2048,4096,8192 for it")
    infer_rows = cost_inference(tok, cfg, base, lengths, run_spec, doc_texts)
    return {"absorb": absorb_rows, "inference": infer_rows, "notes": notes,
            "absorb_text_tokens": cfg.cost_tokens, "window": cfg.window}


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------

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


def md_header(res: dict, cfg: EvalConfig, base: AbsorbConfig) -> str:
    env, lora = res["environment"], base.lora
    return (f"## Results\n\n`{res['command']}` on {env['date']}: {res['model']['name']}, "
            f"{res['model']['params_m']:.0f}M parameters, {env['device']}, {env['torch_threads']} torch thread(s) on "
            f"{env['cpu_count']} CPU(s) ({env['machine']}), torch {env['torch']}, python {env['python']}, commit "
            f"{(env['git_commit'] or 'unknown')[:10]}{' (dirty)' if env['git_dirty'] else ''}. "
            f"LoRA rank {lora.rank}, alpha {lora.alpha:g}, targets {lora.targets}; {steps_text(base)} optimizer steps per "
            f"absorbed window (n = {auto_text(base, 'chunk')}, m = {auto_text(base, 'sync_len')}), lr {lr_text(base)}, "
            f"{auto_text(base, 'batch_tokens')} Y tokens per step (0 = all), window W = {cfg.window} tokens.\n")


def ci_text(x, ci, spec: str = ".3f") -> str:
    """'x [lo, hi]' (a value with its 95% interval), or the value alone when there is none."""
    lo, hi = ci if ci else (None, None)
    if lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return fmt(x, spec)
    return f"{fmt(x, spec)} [{fmt(lo, spec)}, {fmt(hi, spec)}]"


def md_lm_table(summary: dict) -> str:
    rows = [[s["label"], ci_text(s["nll"], s["nll_ci"]), ci_text(s["kl"], s["kl_ci"]),
             ci_text(s["recovered"], s["recovered_ci"]), ci_text(s["recovered_nll"], s["recovered_nll_ci"]),
             fmt(s["absorb_seconds_per_1k_tokens"], ".1f")] for s in summary.values()]
    return markdown_table(["method", "NLL (nats/tok)", "KL(full ‖ method)", "recovered 1 - KL/KL_none",
                           "recovered (NLL)", "absorb s / 1k tok"], rows)


def md_lm(lm: dict, cfg: EvalConfig, plots: dict) -> list[str]:
    docs = ", ".join(f"{d['name']} ({d['segments']} segment(s))" for d in lm["documents"])
    out = [f"### Streaming language modelling\n\n{docs}; context C = {cfg.context} tokens, then "
           f"E = {cfg.eval_len} unseen tokens scored. Absorbing methods absorb the first C - W = "
           f"{cfg.context - cfg.window} tokens and keep the last W = {cfg.window} in the window. Brackets: 95% "
           f"bootstrap intervals over segments.\n"]
    if len(lm["documents"]) > 1:
        for name, summary in lm["by_document"].items():
            out += [f"\n**{name}**\n", md_lm_table(summary)]
        out.append("\n**All documents**\n")
    out.append(md_lm_table(lm["summary"]))
    for key, alt in (("lm", "NLL vs position"), ("lm_layers", "hidden-state distance per layer")):
        if key in plots:
            out.append(f"\n![{alt}]({plots[key]})\n")
    return out


def md_facts(facts: dict, cfg: EvalConfig, plots: dict) -> list[str]:
    lengths = [str(x) for x in ints(cfg.fact_lengths)]
    n_q = len({(r['item'], r['question']) for r in facts['rows']})
    out = [f"### Fact recall\n\n{len(facts['documents'])} generated document(s), {n_q} questions; "
           f"absorbing methods answer with no document in the prompt. lenient = answer contained, strict = "
           f"first line equals the answer (normalised), F1 = SQuAD token F1; per length and position: lenient.\n"]
    rows = [[s["label"], fmt(s["lenient"], ".2f"), fmt(s["strict"], ".2f"), fmt(s["f1"], ".2f")]
            + [fmt(s["by_length"].get(x), ".2f") for x in lengths]
            + [fmt(s["by_position"].get(p), ".2f") for p in POSITIONS]
            + [fmt(s["absorb_seconds_per_1k_tokens"], ".0f")] for s in facts["summary"].values()]
    out.append(markdown_table(["method", "lenient", "strict", "F1"] + [f"len {x}" for x in lengths]
                              + list(POSITIONS) + ["absorb s / 1k tok"], rows))
    if "facts" in plots:
        out.append(f"\n![fact recall]({plots['facts']})\n")
    return out


def md_long(long: dict, base: AbsorbConfig, plots: dict) -> list[str]:
    docs = long["documents"]
    n_q = len({(r["item"], r["question"]) for r in long["rows"]})
    windows = sorted({w for s in long["summary"].values() for w in s["by_window"]}, key=int)
    out = [f"### Long documents\n\n{len(docs)} generated document(s) ("
           + ", ".join(f"{d['length']} tokens {d['style']}, {d['windows']} windows" for d in docs)
           + f"; windows of n = {long.get('chunk', base.chunk)}, m = {long.get('sync_len', base.sync_len)}), {n_q} questions spread over them. Recall = the "
           f"answer occurs in the answer; first sentence = it occurs in the answer's first sentence. Oracle window "
           f"/ passage: each question asked with only the window / paragraph that holds its answer in the prompt. "
           f"Absorbing methods answer with nothing in the prompt.\n"]
    rows = [[s["label"], fmt(s["lenient"], ".2f"), fmt(s["sentence"], ".2f")]
            + [fmt(s["by_third"].get(t), ".2f") for t in POSITIONS]
            + [fmt(s["by_window"].get(w), ".2f") for w in windows]
            + [fmt(s["absorb_seconds_per_1k_tokens"], ".0f"), fmt(mib(s["absorb_peak_extra_bytes"]), ".0f")]
            for s in long["summary"].values()]
    out.append(markdown_table(["method", "recall", "first sentence"] + list(POSITIONS)
                              + [f"window {int(w) + 1}" for w in windows] + ["absorb s / 1k tok", "absorb peak +MiB"],
                              rows))
    ret = [(s["label"], s["retention"]) for s in long["summary"].values() if s.get("retention")]
    if ret:
        out.append("\nRetention: recall of each question right after the window holding its answer was absorbed, "
                   "and after the last window (each updated model is the next window's teacher):\n")
        out.append(markdown_table(["method", "right after its window", "after the last window",
                                   "window 1 right after", "window 1 after the last"],
                                  [[lbl, fmt(r["right_after_its_window"], ".2f"), fmt(r["after_the_last_window"], ".2f"),
                                    fmt(r["window_1_right_after"], ".2f"), fmt(r["window_1_after_the_last"], ".2f")]
                                   for lbl, r in ret]))
    if "long" in plots:
        out.append(f"\n![recall by position]({plots['long']})\n")
    return out


def md_tasks(tasks: dict) -> list[str]:
    rows = [[s["label"], fmt(s["strict"], ".3f"), fmt(s["f1"], ".3f"), fmt(s["lenient"], ".3f"), s["skipped"]]
            for s in tasks["summary"].values()]
    return [f"### Tasks: {tasks['file']} ({tasks['n_tasks']} tasks)\n",
            markdown_table(["method", "exact match", "token F1", "lenient", "skipped (too long)"], rows)]


def md_cost(c: dict, cfg: EvalConfig, base: AbsorbConfig, plots: dict) -> list[str]:
    out = ["### Cost\n"]
    if c["absorb"]:
        rows = [[r["label"], r["tokens"], r["steps"], fmt(r["seconds"], ".1f"), fmt(r["seconds_per_1k_tokens"], ".1f"),
                 fmt(r["seconds_per_step"], ".2f"), fmt(mib(r["memory_peak_bytes"]), ".0f"),
                 fmt(mib(r["memory_extra_bytes"]), ".0f")] for r in c["absorb"]]
        out.append(f"Absorption of a {c['absorb_text_tokens']}-token text as absorb.py does it (probes "
                   f"{base.probes or 'none'}, {auto_text(_RECIPE_DEFAULTS, 'batch_tokens')} Y tokens per step), each "
                   f"method in a fresh process. Wall time includes building the probes, the teacher pass, the "
                   f"teacher-generated Y and a final loss pass, so with few steps it overstates the cost per "
                   f"step (the LM and fact tables give the time at {steps_text(base)} steps); memory is the "
                   f"{c['absorb'][0]['memory_kind']}, extra = above the loaded model:\n")
        out.append(markdown_table(["method", "tokens", "steps", "wall s", "s / 1k tok", "s / step", "peak MiB",
                                   "extra MiB"], rows) + "\n")
    rows = [[r["context_tokens"], r["mode"], r["tokens_in_window"], fmt(mib(r["kv_cache_bytes"]), ".1f"),
             fmt(mib(r["memory_extra_bytes"]), ".0f"), fmt(r["prefill_seconds"], ".2f"),
             fmt(r["decode_ms_per_token_median"], ".1f")] for r in c["inference"]]
    out.append(f"Inference: decode {cfg.decode_tokens} tokens greedily after the context; full = KV cache of "
               f"the whole context, absorbed = last W tokens + merged adapter:\n")
    out.append(markdown_table(["context", "mode", "tokens in KV", "KV cache MiB", "peak extra MiB", "prefill s",
                               "decode ms / tok (median)"], rows))
    out += [f"\nNote: {n}" for n in c["notes"]]
    if "cost" in plots:
        out.append(f"\n![memory and latency]({plots['cost']})\n")
    return out


def markdown(res: dict, cfg: EvalConfig, base: AbsorbConfig, plots: dict) -> str:
    out = [md_header(res, cfg, base)]
    if "lm" in res:
        out += md_lm(res["lm"], cfg, plots)
    if "facts" in res:
        out += md_facts(res["facts"], cfg, plots)
    if "long" in res:
        out += md_long(res["long"], base, plots)
    if "tasks" in res:
        out += md_tasks(res["tasks"])
    if "cost" in res:
        out += md_cost(res["cost"], cfg, base, plots)
    return "\n".join(out) + "\n"


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
    """obj as indented JSON (NaN/inf as null, anything else unknown as its str), atomically."""
    return atomic_write_text(path, json.dumps(_finite(obj), indent=1, default=str))


# ------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)
# ------------------------------------------------------------------------------------------

STYLE = {"full": ("black", "-", "o"), "none": ("grey", ":", "x"), "window": ("tab:blue", "--", "s"),
         "oracle_window": ("tab:cyan", "--", "s"), "oracle_passage": ("tab:olive", "--", "*"),
         "last_window": ("tab:brown", ":", "x"),
         "absorber": ("tab:red", "-", "D"), "l1_norm": ("tab:pink", "-", "d"), "ntp": ("tab:green", "-", "^"),
         "kl": ("tab:purple", "-", "v"),
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
    b.set_ylabel("recovered: 1 - KL(full || method) / KL(full || none)")
    b.set_title("Recovered fraction (1 = full context)")
    return _finish(fig, a, title, path)


def plot_layers(by_document: dict, title: str, path) -> Path:
    """Relative L1 distance of each method's hidden states to the full-context model's on the
    unseen tokens, against depth: one panel per document."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(by_document), figsize=(4.5 * len(by_document), 4), squeeze=False)
    for ax, (name, summary) in zip(axes[0], by_document.items()):
        for m, s in summary.items():
            if m == "full":
                continue
            c, ls, mk = STYLE.get(m, (None, "-", "o"))
            ax.plot(range(len(s["layers"])), s["layers"], color=c, linestyle=ls, marker=mk, markersize=3,
                    label=s["label"])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel("mean |h - h_full| / mean |h_full|")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    return _finish(fig, axes[0][0], title, path)


def plot_long(summary: dict, title: str, path) -> Path:
    """Recall against the window holding the answer (left) and the third of the document (right)."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, s in summary.items():
        c, ls, mk = STYLE.get(name, (None, "-", "o"))
        ws = sorted(s["by_window"], key=int)
        a.plot([int(w) + 1 for w in ws], [s["by_window"][w] for w in ws], color=c, linestyle=ls, marker=mk,
               label=s["label"])
        b.plot(range(len(POSITIONS)), [s["by_third"].get(t, math.nan) for t in POSITIONS], color=c, linestyle=ls,
               marker=mk, label=s["label"])
    a.set_xlabel("window holding the answer")
    b.set_xticks(range(len(POSITIONS)))
    b.set_xticklabels(POSITIONS)
    b.set_xlabel("third of the document holding the answer")
    for ax in (a, b):
        ax.set_ylabel("recall (answer contained)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    return _finish(fig, a, title, path)


def _finish(fig, ax, title: str, path) -> Path:
    """Title, one legend in a row under the panels (never over the data), save, close."""
    fig.suptitle(title)
    handles, labels = ax.get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return Path(path)


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
    return _finish(fig, a, title, path)


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



def make_plots(res: dict, cfg: EvalConfig, n_methods: int, out_dir: Path) -> dict:
    """The PNG plots of the sections that ran: {section: file name in out_dir}."""
    plots = {}
    if "lm" in res:
        plots["lm"] = "lm_nll_position.png"
        plot_lm(res["lm"]["position"], res["lm"]["summary"],
                f"Streaming LM: C={cfg.context}, W={cfg.window}, E={cfg.eval_len}", out_dir / plots["lm"])
        plots["lm_layers"] = "lm_layers.png"
        plot_layers(res["lm"]["by_document"], f"Hidden states on the unseen tokens vs the full-context model "
                    f"(C={cfg.context}, W={cfg.window})", out_dir / plots["lm_layers"])
    if "facts" in res:
        s = res["facts"]["summary"]
        plots["facts"] = "facts_accuracy.png"
        plot_facts({n: v["by_length"] for n, v in s.items()}, {n: v["by_position"] for n, v in s.items()},
                   f"Fact recall ({len(res['facts']['rows']) // max(1, n_methods)} questions per method)",
                   out_dir / plots["facts"])
    if "long" in res:
        plots["long"] = "long_recall_position.png"
        plot_long(res["long"]["summary"], f"Long documents: recall by where the answer sits "
                  f"({len(res['long']['documents'])} document(s))", out_dir / plots["long"])
    if "cost" in res:
        plots["cost"] = "cost_memory_latency.png"
        plot_cost(res["cost"]["inference"], f"Inference cost vs context length (window W={cfg.window})",
                  out_dir / plots["cost"])
    return plots


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = build_parser()
    run_cfg, cfg, base = parse(parser, argv)
    methods = selected_methods(cfg.methods)
    doc_texts, tasks = read_inputs(parser, run_cfg, cfg)        # before the slow model load
    print_config("eval.py", run_cfg, cfg, base)
    setup(run_cfg)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    t_start = time.time()
    model, tok = load(run_cfg.ckpt, device=run_cfg.device, dtype=run_cfg.dtype)
    model.eval()
    apply_lora(model, base.lora)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    say(f"loaded {run_cfg.ckpt or 'the default model'} ({n_params / 1e6:.0f}M parameters) in "
        f"{time.time() - t_start:.1f}s; sections: {cfg.only}; methods: {','.join(m.name for m in methods)}")
    res = {"command": "python " + " ".join(["eval.py"] + (list(argv) if argv is not None else sys.argv[1:])),
           "config": {**asdict(run_cfg), **asdict(base), **asdict(cfg)},
           "absorb_config": {m.name: asdict(method_config(base, m)) for m in methods if m.kind == "absorb"},
           "model": {"name": run_cfg.ckpt or "SmolLM2-135M-Instruct (default model)", "params_m": n_params / 1e6,
                     "config": model.cfg.to_dict()},
           "environment": environment(run_cfg.device), "timings": {}}

    sections = {"lm": lambda: run_lm(model, tok, cfg, base, methods, doc_texts),
                "facts": lambda: run_facts(model, tok, cfg, base, methods),
                "long": lambda: run_long(model, tok, cfg, base, methods),
                "tasks": lambda: run_tasks(model, tok, cfg, base, methods, tasks),
                "cost": lambda: run_cost(model, tok, cfg, base, methods, run_cfg, doc_texts)}
    for name in cfg.sections():
        t0 = time.time()
        res[name] = sections[name]()
        res["timings"][name] = time.time() - t0
        say(f"[{name}] done in {res['timings'][name]:.0f}s")

    res["plots"] = plots = make_plots(res, cfg, len(methods), out_dir)
    res["timings"]["total"] = time.time() - t_start
    res["markdown"] = md = markdown(res, cfg, base, plots)
    write_json(res, out_dir / "results.json")
    atomic_write_text(out_dir / "results.md", md)
    print(md)
    say(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'} and {len(plots)} plot(s); "
        f"total {res['timings']['total']:.0f}s")
    return 0


if __name__ == "__main__":
    run(main)
