"""The fixed piece of absorption work that bench_absorb_ddp.py and bench_absorb_memory.py time:
X = 512 tokens of the demo document, Y = n_y sequences of y_len tokens that follow it (raw text,
BOS prefix where the tokenizer adds one), hidden-state L1, LoRA rank 16 on all seven projections,
lr 1e-3 (the raw-text default), all Y sequences in every step. Each measurement runs in a fresh
process started by the bench script, which reads one JSON line ("@@result {...}") back."""
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def config(**over):
    """The work's AbsorbConfig: hidden-state L1 (explicitly: the raw-text default loss is the hybrid,
    whose KL term over the vocabulary would change both the memory and the time), lr 1e-3."""
    from nanoabsorber.absorber import AbsorbConfig

    return AbsorbConfig(**{"loss": "l1", "lr": 1e-3, **over})


def groups(tok, x_tokens: int = 512, n_y: int = 4, y_len: int = 128) -> list:
    ids = tok.encode((ROOT / "nanoabsorber/assets/demo_document.txt").read_text() * 30)
    prefix = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    x = ids[:x_tokens]
    ys = [ids[x_tokens + j * y_len: x_tokens + (j + 1) * y_len] for j in range(n_y)]
    return [(prefix, x, ys)]


def step_times(log_rows: list) -> list:
    """Seconds of each optimizer step from the loop's log rows (elapsed since the window began)."""
    t = [r["elapsed"] for r in log_rows]
    return [b - a for a, b in zip(t, t[1:])]


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def emit(result: dict) -> None:
    sys.stdout.write("\n@@result " + json.dumps(result) + "\n")
    sys.stdout.flush()


def read_result(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("@@result "):
            return json.loads(line[len("@@result "):])
    return None


def now() -> float:
    return time.perf_counter()


__all__ = ["groups", "step_times", "median", "emit", "read_result", "now", "torch"]


def run_worker(cmd: list, threads: int, extra_env: dict | None = None) -> dict:
    """Run a measurement worker (a fresh process, OMP_NUM_THREADS = threads) and return its result."""
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), NANOABSORBER_QUIET="1", **(extra_env or {}))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    res = read_result(r.stdout)
    if res is None:
        raise SystemExit(f"worker failed: {r.stderr[-2000:]}")
    return res
