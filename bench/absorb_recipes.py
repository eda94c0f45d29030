"""Which absorption recipe recovers the most facts? Runs recipes side by side on the demo
document (nanoabsorber/assets/demo_document.txt, 8 questions) with the default model and prints
facts recovered and wall time. Used to choose absorb.py's default recipe (README, "Recipes").

    python bench/absorb_recipes.py                      # all recipes
    python bench/absorb_recipes.py --recipes recite+entity generic --steps 30
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nanoabsorber import load
from nanoabsorber.absorber import PROBE_LR, AbsorbConfig, absorb_chunk, sample_continuations
from nanoabsorber.lora import apply_lora, reset_lora
from nanoabsorber.metrics import lenient_match
from nanoabsorber.probes import GENERIC, answer, chat_probe_ids, make_probes
from nanoabsorber.sampling import greedy

DATA = Path(__file__).resolve().parents[1] / "nanoabsorber" / "assets"


def build(recipe: str, model, tok, doc: str, gen_tokens: int, seed: int = 0):
    """Probe list for a recipe name like 'recite+entity+generic' ('generic' answers are generated)."""
    parts = recipe.split("+")
    probes = make_probes(doc, parts)
    prefix, x, ys, tail = chat_probe_ids(tok, doc, probes)
    if "generic" in parts or "sampled" in parts:
        end = tok.special_tokens["<|im_end|>"]
        for i, q in enumerate(GENERIC * (3 if "sampled" in parts else 1)):
            ctx = prefix + x + tok.encode(q + tail)
            if "sampled" in parts:
                g = sample_continuations(model, ctx, 1, gen_tokens, 0.8, 0.95, tok.stop_ids, seed=seed * 1000 + i)[0]
            else:
                g = greedy(model, ctx, gen_tokens, tok.stop_ids)
            if g and g[-1] != end:
                g = g + [end]
            ys.append(tok.encode(q + tail) + g)
    return [(prefix, x, ys)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["sampled", "recite", "entity", "recite+entity",
                                                      "recite+entity+generic"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=PROBE_LR)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--targets", default="all")
    p.add_argument("--loss", default="l1")
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--batch-tokens", type=int, default=0)
    p.add_argument("--gen-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA init (and of any sampling)")
    p.add_argument("--out", default=None, help="append JSON lines of results here")
    args = p.parse_args()
    print(json.dumps(vars(args)), file=sys.stderr)
    torch.manual_seed(args.seed)
    model, tok = load()
    doc = (DATA / "demo_document.txt").read_text()
    qs = json.loads((DATA / "demo_questions.json").read_text())
    apply_lora(model, args.targets, args.rank, args.alpha)
    rows = []
    for recipe in args.recipes:
        reset_lora(model, seed=args.seed)
        t0 = time.time()
        groups = build(recipe, model, tok, doc, args.gen_tokens, args.seed)
        n_y = sum(len(y) for y in groups[0][2])
        cfg = AbsorbConfig(steps=args.steps, lr=args.lr, loss=args.loss, batch_tokens=args.batch_tokens,
                           schedule=args.schedule, seed=args.seed)
        res = absorb_chunk(model, groups, cfg, log=lambda d: d['step'] % 5 == 0 and print(
            f"  step {d['step']} loss {d['loss']:.4f} {d['elapsed']:.0f}s", file=sys.stderr, flush=True))
        t_abs = time.time() - t0
        with torch.no_grad():
            preds = [answer(model, tok, q["question"]) for q in qs]
        ok = sum(lenient_match(pr, q["answers"]) for pr, q in zip(preds, qs))
        row = dict(recipe=recipe, facts=ok, of=len(qs), y_tokens=n_y, seconds=round(t_abs, 1),
                   loss0=round(res.first_loss, 4), loss_end=round(res.final_loss, 4),
                   **{k: v for k, v in vars(args).items() if k not in ("recipes", "out")})
        rows.append(row)
        print(json.dumps(row), flush=True)
        for pr, q in zip(preds, qs):
            print(f"   {'OK ' if lenient_match(pr, q['answers']) else '-- '} {q['question']} -> {pr[:70]!r}", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print("\nrecipe                       facts  Y tokens  seconds  loss0 -> loss")
    for r in rows:
        print(f"{r['recipe']:<28} {r['facts']}/{r['of']}  {r['y_tokens']:>8}  {r['seconds']:>7}  {r['loss0']} -> {r['loss_end']}")


if __name__ == "__main__":
    main()
