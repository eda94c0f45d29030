"""Tuning bench for issue 10: how many facts of ONE window does a recipe put within reach?

    python bench/long_window_tune.py --doc-seed 100 --tokens 512 [any absorb.py recipe flag] [--prompt]

The long benchmark (eval.py --only long) asks 12 questions over a whole document, 2-3 per window:
too few to compare recipes on how fast a window's facts are learned. This script takes the first
--tokens tokens of a tuning catalogue (benchdocs.make_long_doc, seeds 100+ are for tuning), absorbs
them as one window (no following text), and asks every fact of every entry that lies whole inside
them (about 5 per entry). With --chunk smaller than --tokens the tokens are absorbed window by
window (Algorithm 2) and recall is also given per window: what the last windows did to the first.
--prompt also answers them with the window in the prompt (the oracle
window). Prints recall (the answer occurs in the answer) and first-sentence recall, absorb seconds
and one line per question with --verbose. Appends a JSON line to --log.
"""
import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanoabsorber import load  # noqa: E402
from nanoabsorber.absorber import AbsorbConfig, absorb_text, resolve_config  # noqa: E402
from nanoabsorber.cli import RunConfig, setup  # noqa: E402
from nanoabsorber.benchdocs import make_long_doc  # noqa: E402
from nanoabsorber.config import Parser, add_flags, build  # noqa: E402
from nanoabsorber.metrics import mean, qa_scores  # noqa: E402
from nanoabsorber.probes import answer  # noqa: E402

p = Parser(description=__doc__.split("\n\n")[0])
p.add_argument("--doc-seed", type=int, default=100, help="tuning document seed (100+)")
p.add_argument("--tokens", type=int, default=512, help="tokens of the window")
p.add_argument("--style", default="catalogue", choices=("catalogue", "prose"))
p.add_argument("--prompt", action="store_true", help="also answer with the window in the prompt")
p.add_argument("--verbose", action="store_true")
p.add_argument("--log", default="runs/long_window_tune.jsonl")
add_flags(p, RunConfig, title="model")
add_flags(p, AbsorbConfig, title="recipe")
args = p.parse_args()
run_cfg, cfg = build(p, RunConfig, args), build(p, AbsorbConfig, args)
setup(run_cfg)
torch.manual_seed(0)

model, tok = load(run_cfg.ckpt, device=run_cfg.device, dtype=run_cfg.dtype)
doc = make_long_doc(args.doc_seed, args.tokens * 2, lambda t: len(tok.encode(t)), args.style)
ids = tok.encode(doc.text)
window = tok.decode(ids[:args.tokens])
qs = [f for e in doc.entries if e.start + len(e.text) <= len(window) for f in e.facts]
# one window of --tokens, or Algorithm 2 over them with an explicit --chunk
cfg = resolve_config(tok, replace(cfg, chunk=cfg.chunk or args.tokens, sync_len=cfg.sync_len or 0))
starts = [len(tok.encode(window[:e.start])) for e in doc.entries if e.start + len(e.text) <= len(window)]
q_win = [min(st // cfg.chunk, (args.tokens - 1) // cfg.chunk) for st, e in zip(starts, doc.entries) for _ in e.facts]
print(f"window: {len(tok.encode(window))} tokens, {len(qs)} questions; {cfg.probes} probes, loss {cfg.loss}, "
      f"lr {cfg.lr:g}, {cfg.steps} steps, batch tokens {cfg.batch_tokens}, rank {cfg.lora.rank}, windows of "
      f"{cfg.chunk}, teacher {cfg.teacher}", flush=True)


def ask(doc_text=None):
    return [qa_scores(answer(model, tok, f.question, doc=doc_text), f.answers) | {"q": f.question}
            for f in qs]


row = {"seed": args.doc_seed, "tokens": args.tokens, "style": args.style, "cfg": asdict(cfg), "n": len(qs),
       "run": asdict(run_cfg)}
if args.prompt:
    ref = ask(window)
    row["prompt_recall"] = mean(r["lenient"] for r in ref)
    print(f"window in the prompt: recall {row['prompt_recall']:.2f}", flush=True)
t0 = time.time()
res = absorb_text(model, tok, window, cfg, log=lambda d: d["step"] % 10 == 0 and print(
    f"  step {d['step']} loss {d['loss']:.4f} ({d['elapsed']:.0f}s)", flush=True))
row["seconds"] = time.time() - t0
got = ask()
for f, r in zip(qs, got):
    r["prediction"] = answer(model, tok, f.question)[:80] if args.verbose else None
    if args.verbose:
        print(f"  {r['lenient']:.0f} {f.question} [{f.answers[0]}] -> {r['prediction']!r}")
row["recall"], row["sentence"] = mean(r["lenient"] for r in got), mean(r["sentence"] for r in got)
row["scores"] = [r["lenient"] for r in got]        # per question, in a fixed order: paired comparisons
row["final_loss"] = res[-1].final_loss
row["by_window"] = {w: mean(r["lenient"] for r, qw in zip(got, q_win) if qw == w) for w in sorted(set(q_win))}
if len(row["by_window"]) > 1:
    print("recall by the window an entry starts in: " + ", ".join(f"{w + 1}: {v:.2f}" for w, v in row["by_window"].items()))
print(f"absorbed: recall {row['recall']:.2f}, first sentence {row['sentence']:.2f}, {row['seconds']:.0f} s "
      f"({row['seconds'] / len(ids[:args.tokens]) * 1000:.0f} s / 1k tokens), final loss {row['final_loss']:.3f}")
Path(args.log).parent.mkdir(parents=True, exist_ok=True)
with open(args.log, "a") as fh:
    fh.write(json.dumps(row) + "\n")
