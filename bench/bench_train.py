"""Training throughput on CPU (not a test), and the loss-curve plot used in docs/train.md.

    python bench/bench_train.py                         # ~10M model (--preset small), 1 and 2 threads
    python bench/bench_train.py --threads 2 --steps 20 --data ../shared/data/austen
    python bench/bench_train.py --plot runs/austen --png docs/train_loss.png   # needs matplotlib

Speed: runs `train.py` as a subprocess (the exact command is printed) on a synthetic corpus
(Zipf-distributed pseudo-words, made in a temporary folder) unless --data is given, and reports
tokens/s as the median over the logged steps after the first two (warm-up). The machine's load
average is printed too: on shared cores other processes change the numbers a lot.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def synthetic_corpus(path: Path, n_bytes: int = 1_500_000, seed: int = 0) -> Path:
    r = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    vocab = ["".join(r.choice(letters[:8 + i % 18]) for _ in range(r.randint(1, 9))) for i in range(5000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    with open(path, "w") as f:
        size = 0
        while size < n_bytes:
            line = " ".join(r.choices(vocab, weights, k=r.randint(5, 20))).capitalize() + ".\n"
            f.write(line)
            size += len(line)
    return path


def bench_speed(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data or str(synthetic_corpus(tmp / "corpus.txt"))
        results = []
        for threads in args.threads:
            out = tmp / f"run-t{threads}"
            cmd = [sys.executable, "train.py", "--data", data, "--out", str(out), "--preset", args.preset,
                   "--vocab-size", str(args.vocab_size), "--seq-len", str(args.seq_len),
                   "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--warmup-steps", "2",
                   "--log-every", "1", "--eval-every", "0", "--val-frac", "0.01", "--eval-batches", "1",
                   "--save-every", "0", "--threads", str(threads), "--cache-dir", str(tmp / "cache")]
            print("$ " + " ".join(cmd), flush=True)
            load0 = os.getloadavg()[0]
            t0 = time.time()
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"train.py failed:\n{r.stderr[-2000:]}")
            rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
            tps = [x["tokens_per_s"] for x in rows if "tokens_per_s" in x and x["step"] > 2]
            model_line = next(x for x in r.stdout.splitlines() if x.startswith("model:"))
            med = statistics.median(tps)
            results.append((threads, med))
            print(f"  {model_line}")
            print(f"  threads {threads}: {med:,.0f} tokens/s (median of {len(tps)} steps, "
                  f"min {min(tps):,.0f}, max {max(tps):,.0f}); load average before {load0:.2f}, "
                  f"wall {time.time() - t0:.0f}s incl. tokenizer and data prep", flush=True)
        print("summary: " + ", ".join(f"{t} thread(s) {v:,.0f} tok/s" for t, v in results)
              + f" | preset {args.preset}, seq {args.seq_len} x batch {args.batch_size}, {os.cpu_count()} CPUs")


def plot(run: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    tr = [(x["step"], x["loss"]) for x in rows if "loss" in x and "event" not in x]
    va = [(x["step"], x["val_loss"]) for x in rows if "val_loss" in x and "event" not in x]
    unigram = next((x["unigram"] for x in rows if "unigram" in x), None)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(*zip(*tr), lw=1, label="train loss")
    ax.plot(*zip(*va), "o-", ms=3, label="validation loss")
    if unigram is not None:
        ax.axhline(unigram, color="gray", ls="--", lw=1, label=f"unigram entropy of val tokens ({unigram:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{run.name}: final val loss {va[-1][1]:.3f}" if va else run.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    print(f"wrote {png}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="text file or folder (default: a synthetic corpus)")
    p.add_argument("--preset", default="small", help="model preset (small ~10M parameters)")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per measurement")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts to measure")
    p.add_argument("--plot", type=Path, default=None, help="instead: plot the log.jsonl of this train.py output folder")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "train_loss.png", help="where --plot writes")
    args = p.parse_args()
    if args.plot:
        plot(args.plot, args.png)
    else:
        bench_speed(args)


if __name__ == "__main__":
    main()
