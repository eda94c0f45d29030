"""Does absorption work? Absorber against its baselines, on the same model, LoRA and step budget.

    python eval.py --quick                                      # < 10 min on 2 CPU cores
    python eval.py --quick --docs ../shared/data/austen/emma.txt --out docs/results
    python eval.py --docs book1.txt book2.txt --tasks mine.jsonl --out results/
    python eval.py --only cost --cost-lengths 1024,2048,4096,8192

Methods: full context (upper bound), no context, window (only the last W tokens), Absorber
(hidden-state sync, L1), NTP absorption (TTT / Temp-LoRA style), logits-only KL distillation,
hybrid hidden-state + KL. Select with --methods.

Sections (--only lm,facts,tasks,cost):
  lm     streaming language modelling: each --docs file (default: a generated story) gives
         segments of C context tokens (--context) then E unseen tokens (--eval-len). full = E after
         all of C; none = E alone; window = E after the last W tokens of C; absorbing methods
         absorb the first C - W tokens (the text that left the window; Y = the real text after
         each absorbed window, never E) and score E after the same last W tokens. Reports NLL
         per token, KL from the full-context model, the fraction of the context effect recovered,
         and NLL against position after the context.
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
import argparse
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from nanoabsorber import DTYPES, load
from nanoabsorber import evaluation as ev
from nanoabsorber.absorber import DEFAULT_PROBES, PROBE_LR, RAW_GEN_TOKENS, RAW_TEXT_LR, AbsorbConfig, absorb_text
from nanoabsorber.attention import set_attention_impl
from nanoabsorber.cli import UserError, add_model_args, print_config, run
from nanoabsorber.lora import apply_lora, reset_lora
from nanoabsorber.probes import answer, question_ids

D = AbsorbConfig()
SECTIONS = ("lm", "facts", "tasks", "cost")
# Sizes: flag default None takes the preset's value (--quick or full); an explicit flag wins.
PRESETS = {
    "full": dict(context=2048, eval_len=512, window=256, lm_segments=2, steps=D.steps, batch_tokens=D.batch_tokens,
                 fact_lengths="256,512,1024", facts_per_doc=6, fact_docs=2, cost_lengths="1024,2048,4096,8192",
                 cost_tokens=1024, cost_steps=D.steps, decode_tokens=32, answer_tokens=32),
    "quick": dict(context=1024, eval_len=256, window=128, lm_segments=1, steps=10, batch_tokens=128,
                  fact_lengths="128,512", facts_per_doc=3, fact_docs=1, cost_lengths="1024,2048,4096",
                  cost_tokens=256, cost_steps=1, decode_tokens=32, answer_tokens=16),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--quick", action="store_true", help="small sizes and few steps: under 10 minutes on 2 CPU cores")
    p.add_argument("--only", default=None,
                   help="comma list of sections to run: lm,facts,tasks,cost "
                        "(default: all; tasks when --tasks is given)")
    p.add_argument("--methods", default=",".join(ev.METHODS), help="comma list of methods: " + ",".join(ev.METHODS))
    p.add_argument("--out", default="eval_out", help="output folder for results.json, results.md and the plots")
    p.add_argument("--docs", nargs="+", default=None,
                   help="long UTF-8 text files for the lm section (default: a generated story)")
    p.add_argument("--tasks", default=None,
                   help='JSONL file of {"context", "question", "answer"} for the tasks section')
    p.add_argument("--tasks-limit", type=int, default=0, help="use only the first N tasks (0 = all)")
    p.add_argument("--context", type=int, default=None, help="lm: context tokens C before the evaluated span")
    p.add_argument("--eval-len", type=int, default=None,
                   help="lm: evaluated tokens E after the context (never trained on)")
    p.add_argument("--window", type=int, default=None,
                   help="W: tokens kept in the attention window by the window and absorbing methods")
    p.add_argument("--lm-segments", type=int, default=None, help="lm: segments (C + E tokens) per document")
    p.add_argument("--buckets", type=int, default=8, help="lm: position buckets for NLL vs position")
    p.add_argument("--fact-lengths", default=None, help="facts: document lengths in tokens, comma list")
    p.add_argument("--facts-per-doc", type=int, default=None,
                   help="facts: facts per document (beginning/middle/end in turn)")
    p.add_argument("--fact-docs", type=int, default=None, help="facts: documents per length")
    p.add_argument("--answer-tokens", type=int, default=None, help="max tokens of a generated answer")
    p.add_argument("--cost-lengths", default=None,
                   help="cost: context lengths for inference memory/latency, comma list")
    p.add_argument("--cost-tokens", type=int, default=None, help="cost: tokens absorbed for the absorption measurement")
    p.add_argument("--cost-steps", type=int, default=None, help="cost: optimizer steps for the absorption measurement")
    p.add_argument("--decode-tokens", type=int, default=None, help="cost: tokens decoded per latency measurement")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scale = alpha / rank)")
    p.add_argument("--targets", default="all", help="LoRA targets: comma list of q,k,v,o,gate,up,down or 'all'")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps per absorbed window (default {D.steps}, --quick 10)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"AdamW learning rate (default {PROBE_LR:g} in the QA sections, where Y holds chat probes; "
                        f"{RAW_TEXT_LR:g} in lm, where Y is raw text)")
    p.add_argument("--chunk", type=int, default=D.chunk, help="n: tokens absorbed per window")
    p.add_argument("--sync-len", type=int, default=D.sync_len, help="m: following tokens used as Y per window")
    p.add_argument("--gen-tokens", type=int, default=None,
                   help=f"teacher-generated Y tokens at the end of a text (default 0 with chat probes, "
                        f"else {RAW_GEN_TOKENS})")
    p.add_argument("--batch-tokens", type=int, default=None, help="Y tokens per optimizer step (0 = all)")
    p.add_argument("--probes", default=DEFAULT_PROBES,
                   help="chat probes for sync methods in the QA sections ('' for none)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads for torch")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA init and of the generated documents")
    args = p.parse_args(argv)
    for k, v in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.only is None:
        args.only = [s for s in SECTIONS if s != "tasks" or args.tasks]
    else:
        args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in SECTIONS]
    if bad or not args.only:
        raise UserError(f"--only: unknown section(s) {bad or args.only}; choose from {','.join(SECTIONS)}")
    if "tasks" in args.only and not args.tasks:
        raise UserError("--only tasks needs --tasks FILE.jsonl")
    args.fact_lengths = ev.parse_ints(args.fact_lengths, "--fact-lengths")
    args.cost_lengths = ev.parse_ints(args.cost_lengths, "--cost-lengths")
    for k in ("context", "eval_len", "window", "lm_segments", "steps", "answer_tokens", "decode_tokens", "cost_tokens"):
        if getattr(args, k) <= 0 and not (k == "steps" and getattr(args, k) == 0):
            raise UserError(f"--{k.replace('_', '-')} must be positive")
    if args.window >= args.context:
        raise UserError(f"--window ({args.window}) must be smaller than --context ({args.context})")
    return args


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


# ------------------------------------------------------------------------------------------
# Streaming language modelling
# ------------------------------------------------------------------------------------------

def lm_documents(args, tok) -> list:
    """[(name, [segment ids, ...])]: from --docs, or one generated story."""
    n = args.context + args.eval_len
    if args.docs:
        return [(Path(p).name, ev.document_segments(text, tok, n, args.lm_segments, p)) for p, text in args.doc_texts]
    count = lambda s: len(tok.encode(s))  # noqa: E731
    segs = [tok.encode(ev.make_story(args.seed + k, n + 64, count))[:n] for k in range(args.lm_segments)]
    return [("generated story", segs)]


def lr_text(args) -> str:
    return f"{args.lr:g}" if args.lr else f"{RAW_TEXT_LR:g} (lm, raw-text Y) / {PROBE_LR:g} (QA sections, chat probes)"


def run_lm(model, tok, args, methods, base_cfg) -> dict:
    prefix = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    if len(prefix) + args.context + args.eval_len > model.cfg.max_seq_len:
        raise UserError(f"--context + --eval-len = {args.context + args.eval_len} exceeds the model's "
                        f"{model.cfg.max_seq_len}-token context")
    C, W = args.context, args.window
    segments, per_token = [], {}        # per_token[name]: one (E-1,) NLL tensor per segment
    docs = lm_documents(args, tok)
    for name, segs in docs:
        for si, ids in enumerate(segs):
            ctx, target = ids[:C], ids[C:]
            say(f"[lm] {name} segment {si + 1}/{len(segs)}: context {C}, window {W}, evaluated {len(target)} tokens")
            reset_lora(model, args.seed)
            # the two references of the recovered fraction are always measured, selected or not
            refs = {"full": ev.lm_logprobs(model, prefix, ctx, target),
                    "none": ev.lm_logprobs(model, prefix, [], target)}
            for ref, logp in refs.items():
                per_token.setdefault(ref, []).append(ev.token_nlls(logp, target))
            row = {"document": name, "segment": si, "methods": {}}
            for m in methods:
                reset_lora(model, args.seed)
                t0, absorbed = time.time(), None
                if m.kind == "absorb":
                    cfg = ev.method_config(base_cfg, m)
                    res = ev.absorb_dropped(model, ctx, W, cfg, prefix, step_logger(f"[lm] {m.name}", cfg.steps))
                    absorbed = {"tokens": C - W, "windows": len(res), "steps": sum(r.steps for r in res),
                                "seconds": time.time() - t0, "first_loss": res[0].first_loss,
                                "final_loss": res[-1].final_loss}
                if m.kind in refs:
                    logp, nlls = refs[m.kind], per_token[m.kind][-1]
                else:
                    logp = ev.lm_logprobs(model, prefix, ctx[-W:], target)   # window, or absorbed + window
                    nlls = ev.token_nlls(logp, target)
                    per_token.setdefault(m.name, []).append(nlls)
                kl = float(ev.token_kls(refs["full"], logp).mean())
                row["methods"][m.name] = {"nll": float(nlls.mean()), "kl": kl, "absorb": absorbed}
                say(f"[lm]   {m.label:22s} NLL {float(nlls.mean()):.4f}  KL {kl:.4f}"
                    + (f"  (absorbed {C - W} tokens in {absorbed['seconds']:.0f}s)" if absorbed else ""))
            segments.append(row)
    reset_lora(model, args.seed)
    return {"documents": [{"name": n, "segments": len(s)} for n, s in docs], "segments": segments,
            "summary": ev.lm_summary(segments, per_token, methods),
            "position": ev.nll_by_position({m.name: per_token[m.name] for m in methods}, args.buckets)}


# ------------------------------------------------------------------------------------------
# Question answering (facts and tasks share this)
# ------------------------------------------------------------------------------------------

def answer_all(model, tok, items: list, methods, base_cfg, args, tag: str) -> list:
    """items: [{"context": str, "questions": [{"question", "answers", ...meta}], ...meta}].
    Every method answers every question; absorbing methods absorb each context first (fresh LoRA)
    and answer without it. Returns one row per (item, question, method)."""
    rows = []
    for ii, item in enumerate(items):
        ctx = item["context"]
        ctx_ids = tok.encode(ctx)
        window_text = tok.decode(ctx_ids[-args.window:])
        say(f"[{tag}] document {ii + 1}/{len(items)}: {len(ctx_ids)} tokens, {len(item['questions'])} question(s)")
        for m in methods:
            reset_lora(model, args.seed)
            absorbed = None
            if m.kind == "absorb":
                cfg = ev.method_config(base_cfg, m)
                t0 = time.time()
                log = step_logger(f"[{tag}] {m.name}", cfg.steps)
                res = absorb_text(model, tok, ctx, cfg, probes=args.probes, log=log)
                absorbed = {"tokens": len(ctx_ids), "steps": sum(r.steps for r in res), "seconds": time.time() - t0}
            doc = {"full": ctx, "window": window_text}.get(m.kind)
            for q in item["questions"]:
                meta = {k: v for k, v in q.items() if k not in ("question", "answers")}
                row = {"item": ii, "method": m.name, "question": q["question"], "answers": q["answers"],
                       "context_tokens": len(ctx_ids), "absorb": absorbed, **meta,
                       **{k: v for k, v in item.items() if k not in ("context", "questions")}}
                if len(question_ids(tok, q["question"], doc)) + args.answer_tokens > model.cfg.max_seq_len:
                    row.update(prediction=None, skipped="prompt longer than the model's context")
                else:
                    with torch.no_grad():
                        pred = answer(model, tok, q["question"], doc=doc, max_tokens=args.answer_tokens)
                    row.update(prediction=pred, **ev.qa_scores(pred, q["answers"]))
                rows.append(row)
            got = [r for r in rows if r["item"] == ii and r["method"] == m.name and r.get("prediction") is not None]
            say(f"[{tag}]   {m.label:22s} correct {sum(r['lenient'] for r in got):.0f}/{len(got)} (lenient)"
                + (f"  (absorbed in {absorbed['seconds']:.0f}s)" if absorbed else ""))
    reset_lora(model, args.seed)
    return rows


def qa_summary(rows: list, methods, by: tuple = ()) -> dict:
    """Mean lenient/strict/F1 per method, and lenient accuracy grouped by each key in `by`."""
    out = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m.name and r.get("prediction") is not None]
        ab = {(r["item"]): r["absorb"] for r in mine if r["absorb"]}
        toks, secs = sum(a["tokens"] for a in ab.values()), sum(a["seconds"] for a in ab.values())
        s = {"label": m.label, "n": len(mine), "skipped": sum(1 for r in rows if r["method"] == m.name) - len(mine),
             "lenient": ev.mean(r["lenient"] for r in mine), "strict": ev.mean(r["strict"] for r in mine),
             "f1": ev.mean(r["f1"] for r in mine),
             "absorb_seconds_per_1k_tokens": secs / toks * 1000 if toks else None}
        for key in by:
            groups = sorted({r[key] for r in mine}, key=lambda v: (isinstance(v, str), v))
            s[f"by_{key}"] = {str(g): ev.mean(r["lenient"] for r in mine if r[key] == g) for g in groups}
        out[m.name] = s
    return out


def run_facts(model, tok, args, methods, base_cfg) -> dict:
    count = lambda s: len(tok.encode(s))  # noqa: E731
    items = []
    for li, length in enumerate(args.fact_lengths):
        for k in range(args.fact_docs):
            doc = ev.make_fact_doc(args.seed * 1000 + 100 * li + k, length, args.facts_per_doc, count)
            items.append({"context": doc.text, "length": length, "seed": doc.seed,
                          "questions": [{"question": f.question, "answers": f.answers, "position": f.position}
                                        for f in doc.facts]})
    rows = answer_all(model, tok, items, methods, base_cfg, args, "facts")
    return {"documents": [{"length": it["length"], "seed": it["seed"], "tokens": count(it["context"]),
                           "text": it["context"]} for it in items],
            "rows": rows, "summary": qa_summary(rows, methods, by=("length", "position"))}


def run_tasks(model, tok, args, methods, base_cfg) -> dict:
    tasks = args.task_items
    items = [{"context": t["context"], "line": t["line"],
              "questions": [{"question": t["question"], "answers": t["answers"]}]} for t in tasks]
    rows = answer_all(model, tok, items, methods, base_cfg, args, "tasks")
    return {"file": str(args.tasks), "n_tasks": len(tasks), "rows": rows, "summary": qa_summary(rows, methods)}


# ------------------------------------------------------------------------------------------
# Cost
# ------------------------------------------------------------------------------------------

def cost_text_ids(args, tok, n: int) -> list:
    """n tokens of realistic text: the first --docs file, else a generated story."""
    if args.docs:
        path, text = args.doc_texts[0]
        return ev.document_segments(text, tok, n, 1, path)[0]
    ids = tok.encode(ev.make_story(args.seed + 1, n + 64, lambda s: len(tok.encode(s))))
    return ids[:n]


def run_cost(model, tok, args, methods, base_cfg) -> dict:
    common = {"ckpt": args.ckpt, "device": args.device, "dtype": args.dtype, "attn": args.attn, "threads": args.threads,
              "rank": args.rank, "alpha": args.alpha, "targets": args.targets}
    notes = []
    absorb_rows = []
    text = tok.decode(cost_text_ids(args, tok, args.cost_tokens))
    for m in [m for m in methods if m.kind == "absorb"]:
        # the recipe's own Y batch (absorb.py's), so that the peak is the same at every step
        cfg = replace(ev.method_config(base_cfg, m), steps=args.cost_steps, batch_tokens=D.batch_tokens)
        say(f"[cost] absorbing {args.cost_tokens} tokens with {m.label}, {cfg.steps} steps (fresh process) ...")
        r = ev.run_isolated({"kind": "absorb", **common, "cfg": asdict(cfg), "text": text, "probes": args.probes})
        absorb_rows.append({"method": m.name, "label": m.label, **r})
        say(f"[cost]   {r['seconds']:.1f}s ({r['seconds_per_1k_tokens']:.1f}s per 1k tokens), peak "
            f"{ev.mib(r['memory_peak_bytes']):.0f} MiB, +{ev.mib(r['memory_extra_bytes']):.0f} MiB over the "
            f"loaded model")
    limit = model.cfg.max_seq_len - args.decode_tokens
    lengths = sorted({min(L, limit) for L in args.cost_lengths})
    if max(args.cost_lengths) > limit:
        notes.append(f"context lengths above {limit} (model context {model.cfg.max_seq_len} minus "
                     f"{args.decode_tokens} decoded tokens) were measured at {limit}")
    if args.quick and max(args.cost_lengths) < 8192:
        notes.append("--quick: the 8k-token point is dropped (prefill of 8k tokens is slow on CPU); "
                     "run without --quick or with --cost-lengths 1024,2048,4096,8192 for it")
    ids = cost_text_ids(args, tok, max(lengths)) if args.docs else _repeat(cost_text_ids(args, tok, 2048), max(lengths))
    infer_rows = []
    for L in lengths:
        for mode in ("full", "absorbed"):
            window = min(args.window, L)
            say(f"[cost] inference, context {L} tokens, {mode}" + (f" (window {window})" if mode == "absorbed" else "")
                + f": decode {args.decode_tokens} tokens (fresh process) ...")
            r = ev.run_isolated({"kind": "inference", **common, "mode": mode, "ids": ids[:L], "window": window,
                                 "decode_tokens": args.decode_tokens})
            infer_rows.append({"context_tokens": L, "mode": mode, **r})
            say(f"[cost]   KV cache {ev.mib(r['kv_cache_bytes']):.1f} MiB, "
                f"peak +{ev.mib(r['memory_extra_bytes']):.0f} MiB, "
                f"prefill {r['prefill_seconds']:.2f}s, decode {r['decode_ms_per_token_median']:.1f} ms/token (median)")
    return {"absorb": absorb_rows, "inference": infer_rows, "notes": notes,
            "absorb_text_tokens": args.cost_tokens, "window": args.window}


def _repeat(ids: list, n: int) -> list:
    return (ids * (n // max(1, len(ids)) + 1))[:n]


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------

def markdown(res: dict, args, plots: dict) -> str:
    f = ev.fmt
    env, out = res["environment"], []
    out.append("## Results\n")
    out.append(f"`{res['command']}` on {env['date']}: {res['model']['name']}, {res['model']['params_m']:.0f}M "
               f"parameters, {env['device']}, {env['torch_threads']} torch thread(s) on {env['cpu_count']} CPU(s) "
               f"({env['machine']}), torch {env['torch']}, python {env['python']}, commit "
               f"{(env['git_commit'] or 'unknown')[:10]}{' (dirty)' if env['git_dirty'] else ''}. "
               f"LoRA rank {args.rank}, alpha {args.alpha:g}, targets {args.targets}; {args.steps} optimizer steps per "
               f"absorbed window (n = {args.chunk}, m = {args.sync_len}), "
               f"lr {lr_text(args)}, "
               f"{args.batch_tokens or 'all'} Y tokens per step, window W = {args.window} tokens.\n")
    if "lm" in res:
        lm = res["lm"]
        docs = ", ".join(f"{d['name']} ({d['segments']} segment(s))" for d in lm["documents"])
        out.append(f"### Streaming language modelling\n\n{docs}; context C = {args.context} tokens, then "
                   f"E = {args.eval_len} unseen tokens scored. Absorbing methods absorb the first C - W = "
                   f"{args.context - args.window} tokens and keep the last W in the window.\n")
        rows = [[s["label"], f(s["nll"], ".4f"), f(s["ppl"], ".2f"), f(s["kl"], ".4f"), f(s["recovered"], ".3f"),
                 f(s["absorb_seconds_per_1k_tokens"], ".1f")] for s in lm["summary"].values()]
        out.append(ev.markdown_table(["method", "NLL (nats/tok)", "ppl", "KL from full", "recovered",
                                      "absorb s / 1k tok"], rows))
        if "lm" in plots:
            out.append(f"\n![NLL vs position]({plots['lm']})\n")
    if "facts" in res:
        fs = res["facts"]["summary"]
        lengths = [str(x) for x in args.fact_lengths]
        n_q = len({(r['item'], r['question']) for r in res['facts']['rows']})
        out.append(f"### Fact recall\n\n{len(res['facts']['documents'])} generated document(s), {n_q} questions; "
                   f"absorbing methods answer with no document in the prompt. lenient = answer contained, strict = "
                   f"first line equals the answer (normalised), F1 = SQuAD token F1; per length and position: "
                   f"lenient.\n")
        rows = [[s["label"], f(s["lenient"], ".2f"), f(s["strict"], ".2f"), f(s["f1"], ".2f")]
                + [f(s["by_length"].get(x), ".2f") for x in lengths]
                + [f(s["by_position"].get(p), ".2f") for p in ev.POSITIONS]
                + [f(s["absorb_seconds_per_1k_tokens"], ".0f")] for s in fs.values()]
        out.append(ev.markdown_table(["method", "lenient", "strict", "F1"] + [f"len {x}" for x in lengths]
                                     + list(ev.POSITIONS) + ["absorb s / 1k tok"], rows))
        if "facts" in plots:
            out.append(f"\n![fact recall]({plots['facts']})\n")
    if "tasks" in res:
        ts = res["tasks"]["summary"]
        out.append(f"### Tasks: {res['tasks']['file']} ({res['tasks']['n_tasks']} tasks)\n")
        rows = [[s["label"], f(s["strict"], ".3f"), f(s["f1"], ".3f"), f(s["lenient"], ".3f"), s["skipped"]]
                for s in ts.values()]
        out.append(ev.markdown_table(["method", "exact match", "token F1", "lenient", "skipped (too long)"], rows))
    if "cost" in res:
        c = res["cost"]
        out.append("### Cost\n")
        if c["absorb"]:
            rows = [[r["label"], r["tokens"], r["steps"], f(r["seconds"], ".1f"), f(r["seconds_per_1k_tokens"], ".1f"),
                     f(r["seconds_per_step"], ".2f"), f(ev.mib(r["memory_peak_bytes"]), ".0f"),
                     f(ev.mib(r["memory_extra_bytes"]), ".0f")] for r in c["absorb"]]
            out.append(f"Absorption of a {c['absorb_text_tokens']}-token text as absorb.py does it (probes "
                       f"{args.probes or 'none'}, {D.batch_tokens or 'all'} Y tokens per step), each method in a "
                       f"fresh process. Wall time includes building the probes, the teacher pass, the "
                       f"teacher-generated Y and a final loss pass, so with few steps it overstates the cost per "
                       f"step (the LM and fact tables give the time at {args.steps} steps); memory is the "
                       f"{c['absorb'][0]['memory_kind']}, extra = above the loaded model:\n")
            out.append(ev.markdown_table(["method", "tokens", "steps", "wall s", "s / 1k tok", "s / step",
                                          "peak MiB", "extra MiB"], rows) + "\n")
        rows = [[r["context_tokens"], r["mode"], r["tokens_in_window"], f(ev.mib(r["kv_cache_bytes"]), ".1f"),
                 f(ev.mib(r["memory_extra_bytes"]), ".0f"), f(r["prefill_seconds"], ".2f"),
                 f(r["decode_ms_per_token_median"], ".1f")] for r in c["inference"]]
        out.append(f"Inference: decode {args.decode_tokens} tokens greedily after the context; full = KV cache of "
                   f"the whole context, absorbed = last W tokens + merged adapter:\n")
        out.append(ev.markdown_table(["context", "mode", "tokens in KV", "KV cache MiB", "peak extra MiB",
                                      "prefill s", "decode ms / tok (median)"], rows))
        for n in c["notes"]:
            out.append(f"\nNote: {n}")
        if "cost" in plots:
            out.append(f"\n![memory and latency]({plots['cost']})\n")
    return "\n".join(out) + "\n"


def main(argv=None):
    args = parse_args(argv)
    print_config("eval.py", args)
    torch.set_num_threads(args.threads)
    set_attention_impl(args.attn)
    methods = ev.parse_methods(args.methods)
    # read (and validate) the input files before the slow model load
    args.doc_texts = [(p, ev.read_text_file(p)) for p in args.docs or [] if "lm" in args.only or "cost" in args.only]
    if "tasks" in args.only:
        args.task_items = ev.load_tasks(args.tasks)[:args.tasks_limit or None]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    model, tok = load(args.ckpt, device=args.device, dtype=DTYPES[args.dtype])
    model.eval()
    apply_lora(model, args.targets, args.rank, args.alpha)
    base_cfg = replace(D, steps=args.steps, lr=args.lr, chunk=args.chunk, sync_len=args.sync_len,
                       gen_tokens=args.gen_tokens, batch_tokens=args.batch_tokens, seed=args.seed)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    say(f"loaded {args.ckpt or 'the default model'} ({n_params / 1e6:.0f}M parameters) in "
        f"{time.time() - t_start:.1f}s; "
        f"sections: {','.join(args.only)}; methods: {','.join(m.name for m in methods)}")
    res = {"command": "python " + " ".join(["eval.py"] + (argv if argv is not None else sys.argv[1:])),
           "config": {k: v for k, v in vars(args).items() if k not in ("task_items", "doc_texts")},
           "absorb_config": {m.name: asdict(ev.method_config(base_cfg, m)) for m in methods if m.kind == "absorb"},
           "model": {"name": args.ckpt or "SmolLM2-135M-Instruct (default model)", "params_m": n_params / 1e6,
                     "config": model.cfg.to_dict()},
           "environment": ev.environment(args.device, args.threads), "timings": {}}
    sections = {"lm": run_lm, "facts": run_facts, "tasks": run_tasks, "cost": run_cost}
    for name in [s for s in SECTIONS if s in args.only]:
        t0 = time.time()
        res[name] = sections[name](model, tok, args, methods, base_cfg)
        res["timings"][name] = time.time() - t0
        say(f"[{name}] done in {res['timings'][name]:.0f}s")

    plots = {}
    if "lm" in res:
        plots["lm"] = "lm_nll_position.png"
        ev.plot_lm(res["lm"]["position"], res["lm"]["summary"],
                   f"Streaming LM: C={args.context}, W={args.window}, E={args.eval_len}", out_dir / plots["lm"])
    if "facts" in res:
        s = res["facts"]["summary"]
        plots["facts"] = "facts_accuracy.png"
        ev.plot_facts({n: v["by_length"] for n, v in s.items()}, {n: v["by_position"] for n, v in s.items()},
                      f"Fact recall ({len(res['facts']['rows']) // max(1, len(methods))} questions per method)",
                      out_dir / plots["facts"])
    if "cost" in res:
        plots["cost"] = "cost_memory_latency.png"
        ev.plot_cost(res["cost"]["inference"], f"Inference cost vs context length (window W={args.window})",
                     out_dir / plots["cost"])
    res["timings"]["total"] = time.time() - t_start
    res["plots"] = plots
    md = markdown(res, args, plots)
    res["markdown"] = md
    ev.write_json(res, out_dir / "results.json")
    (out_dir / "results.md").write_text(md)
    print(md)
    say(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'} and {len(plots)} plot(s); "
        f"total {res['timings']['total']:.0f}s")
    return 0


if __name__ == "__main__":
    run(main)
