"""Speed and memory of absorption on the default model (a script, not a test).

    python bench/bench_absorb.py [--tokens 1024] [--sync-len 512] [--rank 16] [--steps 5]
Absorbs `--tokens` tokens of text (X) with `--sync-len` following tokens (Y), LoRA rank 16 on all
seven projections, and prints seconds per optimizer step, the one-off teacher pass time, how many
teacher passes ran (must be 1 per window, never per step), and peak resident memory
(ru_maxrss of this process, which includes the model itself).
"""
import argparse
import resource
import time
from pathlib import Path

import torch

import nanoabsorber.absorber as ab  # noqa: E402
from nanoabsorber import load  # noqa: E402
from nanoabsorber.lora import apply_lora  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="n: tokens absorbed")
    p.add_argument("--sync-len", type=int, default=512, help="m: Y tokens")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=ab.RAW_TEXT_LR, help="AdamW lr (raw-text Y: RAW_TEXT_LR)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--text", default=None, help="text file (default: the demo document repeated)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load()
    root = Path(__file__).resolve().parents[1]
    text = Path(args.text).read_text() if args.text else (root / "nanoabsorber/assets/demo_document.txt").read_text() * 30
    ids = tok.encode(text)
    need = args.tokens + args.sync_len
    if len(ids) < need:
        raise SystemExit(f"{args.text or 'demo text'}: only {len(ids)} tokens, need {need}")
    apply_lora(model, "all", args.rank, 2 * args.rank)
    calls = {"teacher": 0, "t": 0.0}
    real = ab.teacher_targets

    def counted(*a, **kw):
        t = time.perf_counter()
        out = real(*a, **kw)
        calls["teacher"] += 1
        calls["t"] += time.perf_counter() - t
        return out

    ab.teacher_targets = counted
    stamps = []
    cfg = ab.AbsorbConfig(steps=args.steps, lr=args.lr, chunk=args.tokens, sync_len=args.sync_len, gen_tokens=0)
    t0 = time.perf_counter()
    x, y = ids[:args.tokens], ids[args.tokens:need]          # one window of Algorithm 2
    res = [ab.absorb_chunk(model, [([], x, [y])], cfg, log=lambda d: stamps.append(time.perf_counter()))]
    total = time.perf_counter() - t0
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(f"absorb n={args.tokens} m={args.sync_len} rank={args.rank} all targets, {args.threads} threads, fp32")
    print(f"teacher passes: {calls['teacher']} for {len(res)} window(s) and {sum(r.steps for r in res)} steps "
          f"({calls['t']:.2f}s)")
    print(f"seconds per step: {per_step:.2f}   (total {total:.1f}s incl. teacher pass and final loss)")
    print(f"peak RSS: {rss:.2f} GB   loss {res[0].first_loss:.4f} -> {res[0].final_loss:.4f}")


if __name__ == "__main__":
    main()
