"""Decode speed and load time of the default model on this machine (a script, not a test).

    python bench/bench_decode.py [--threads 2] [--new-tokens 64]
Prints: load time of the cached default model, greedy decoding tokens/s with the KV cache at a
16-token and a 1024-token prompt (prefill timed separately), fp32.
"""
import argparse
import time
from pathlib import Path

import torch

from nanoabsorber import load  # noqa: E402
from nanoabsorber.default_model import default_model_dir  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per measurement")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    default_model_dir()  # convert first if needed, so load time measures the cached load
    t0 = time.perf_counter()
    model, tok = load(dtype=args.dtype)
    t_load = time.perf_counter() - t0
    print(f"load (cached default model, {args.dtype}): {t_load:.2f}s   [threads={args.threads}, {torch.__version__}]")
    text = Path(__file__).with_name("..").resolve().joinpath("nanoabsorber/assets/demo_document.txt").read_text() * 8
    base = tok.encode(text)
    for n_prompt in (16, 1024):
        ids = torch.tensor([base[:n_prompt]])
        with torch.inference_mode():
            model(ids[:, :8])  # warm-up
            cache = model.new_cache(1, n_prompt + args.new_tokens)
            t1 = time.perf_counter()
            logits = model(ids, cache=cache)[:, -1]
            t_prefill = time.perf_counter() - t1
            t2 = time.perf_counter()
            for _ in range(args.new_tokens):
                nxt = logits.argmax(-1, keepdim=True)
                logits = model(nxt, cache=cache)[:, -1]
            t_dec = time.perf_counter() - t2
        print(f"prompt {n_prompt:>5} tokens: prefill {t_prefill:.2f}s ({n_prompt / t_prefill:.0f} tok/s), "
              f"greedy decode {args.new_tokens / t_dec:.1f} tokens/s")


if __name__ == "__main__":
    main()
