"""Composition on eval.py's generated fact documents: two documents absorbed separately (fresh
LoRA each, the default recipe unless --steps says otherwise), then asked about both documents'
facts with: both documents in the prompt, adapter A alone, adapter B alone, and A + B composed
(nanoabsorber.lora.compose: concatenated along the rank, the updates summed), A + B with weights
0.5 each (the updates averaged), the base model with nothing, and A composed on its own (a check:
it must answer as adapter A does). Scores: lenient match (answer contained) and SQuAD F1, as eval.py's facts section.

    python bench/compose_facts.py [--length 128] [--facts 3] [--steps 90] [--threads 1]
        [--out bench/results/compose_facts.txt]
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=128, help="tokens per document")
    p.add_argument("--facts", type=int, default=3, help="facts (questions) per document")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    p.add_argument("--seeds", default="0,1", help="the two documents' seeds (make_fact_doc)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--out", default=str(HERE / "results" / "compose_facts.txt"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from nanoabsorber import load
    from nanoabsorber.absorber import AbsorbConfig, absorb_text, resolve_config
    from nanoabsorber.benchdocs import make_fact_doc
    from nanoabsorber.io import atomic_write_text
    from nanoabsorber.lora import compose, load_adapter, lora_modules, lora_state_dict, reset_lora, save_adapter
    from nanoabsorber.metrics import qa_scores
    from nanoabsorber.probes import answer

    t_start = time.time()
    model, tok = load()
    count = lambda s: len(tok.encode(s))  # noqa: E731
    cfg = AbsorbConfig() if args.steps is None else AbsorbConfig(steps=args.steps)
    cfg = resolve_config(tok, cfg)
    seeds = [int(s) for s in args.seeds.split(",")]
    docs = [make_fact_doc(s, args.length, args.facts, count) for s in seeds]
    tmp = Path(args.out).parent / ".compose_facts_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    paths, absorb_s = [], []
    for name, d in zip("AB", docs):
        if lora_modules(model):
            reset_lora(model, cfg.seed)          # a fresh LoRA for each document
        else:
            torch.manual_seed(cfg.seed)          # as absorb.py: the LoRA init from the seed
        t0 = time.time()
        res = absorb_text(model, tok, d.text, cfg)
        absorb_s.append(time.time() - t0)
        paths.append(save_adapter(model, tmp / f"{name}.safetensors"))
        print(f"absorbed document {name} ({count(d.text)} tokens) in {absorb_s[-1]:.0f}s, loss "
              f"{res[0].first_loss:.4f} -> {res[-1].final_loss:.4f}", file=sys.stderr, flush=True)
    both = "\n\n".join(d.text for d in docs)
    questions = [(name, f) for name, d in zip("AB", docs) for f in d.facts]

    def ask(doc=None) -> list:
        with torch.no_grad():
            return [answer(model, tok, f.question, doc=doc, max_tokens=args.answer_tokens) for _, f in questions]

    preds = {}
    fresh = {k: torch.zeros_like(v) for k, v in lora_state_dict(model).items() if k.endswith("lora_B")}
    model.load_state_dict(fresh, strict=False)                        # B = 0: the base model
    preds["base model, no document"] = ask()
    preds["both documents in the prompt"] = ask(both)
    for name, path in zip("AB", paths):
        load_adapter(model, path)
        preds[f"adapter {name} alone"] = ask()
    # composed adapters have their own rank: a fresh model each (LoRA modules of that rank)
    for label, parts, weights in (("A composed alone (check: = adapter A)", paths[:1], None),
                                  ("A + B composed", paths, None),
                                  ("A + B composed, weights 0.5 each", paths, [0.5, 0.5])):
        model, tok = load()
        load_adapter(model, compose(parts, weights), merge=True)
        preds[label] = ask()

    rows = []
    for method, ps in preds.items():
        sc = [qa_scores(pr, f.answers) for pr, (_, f) in zip(ps, questions)]
        per = {n: [s["lenient"] for s, (dn, _) in zip(sc, questions) if dn == n] for n in "AB"}
        rows.append((method, sum(per["A"]), len(per["A"]), sum(per["B"]), len(per["B"]),
                     sum(s["lenient"] for s in sc) / len(sc), sum(s["f1"] for s in sc) / len(sc)))
    cmd = " ".join(["python bench/compose_facts.py"] + sys.argv[1:])
    lines = [f"# {cmd}",
             f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs (shared machine), "
             f"{torch.get_num_threads()} torch thread(s); total {time.time() - t_start:.0f}s",
             f"# default model; documents make_fact_doc(seed {seeds[0]} / {seeds[1]}, {args.length} tokens, "
             f"{args.facts} facts); recipe: probes {cfg.probes!r}, {cfg.steps} steps, lr {cfg.lr:g}, rank "
             f"{cfg.lora.rank}, alpha {cfg.lora.alpha:g}, targets {cfg.lora.targets}; absorbing took "
             f"{absorb_s[0]:.0f}s / {absorb_s[1]:.0f}s",
             "", "| method | doc A correct | doc B correct | lenient (both) | F1 (both) |", "|---|---|---|---|---|"]
    for method, a, na, b, nb, len_, f1 in rows:
        lines.append(f"| {method} | {a:.0f}/{na} | {b:.0f}/{nb} | {len_:.2f} | {f1:.2f} |")
    lines += ["", "answers:"]
    for qi, (dn, f) in enumerate(questions):
        lines.append(f"[{dn}] {f.question} (expected: {f.answers[0]})")
        for method, ps in preds.items():
            lines.append(f"    {method:<30} {json.dumps(ps[qi][:90])}")
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(args.out, text)
    for path in paths:
        path.unlink(missing_ok=True)
    tmp.rmdir()


if __name__ == "__main__":
    main()
