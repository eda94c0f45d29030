"""Data-parallel absorption: seconds per optimizer step with 1 process vs N processes (torchrun,
gloo on CPU), side by side on the same work (bench/absorb_work.py: X 512 tokens, Y 4 x 128,
hidden-state L1, rank 16, all projections, default model).

    python bench/bench_absorb_ddp.py [--steps 6] [--procs 2] [--repeats 2] [--out bench/results/absorb_ddp.txt]

Runs, alternating so a changing machine load hits every configuration: 1 process x 1 thread,
N processes x 1 thread each (torchrun), and 1 process x N threads (the same cores used by
intra-op threading instead). Per-step time = median over the steps after the first. Prints a
table and writes it (with the machine's load average) to --out."""
import argparse
import os
import socket
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import absorb_work as W  # noqa: E402


def worker(args) -> None:
    import torch

    from nanoabsorber import distributed, load
    from nanoabsorber.absorber import absorb_chunk
    from nanoabsorber.lora import apply_lora

    torch.set_num_threads(args.threads)
    procs = distributed.start_processes("cpu")
    torch.manual_seed(0)
    model, tok = load()
    cfg = W.config(steps=args.steps)
    apply_lora(model, cfg.lora)
    rows = []
    t0 = W.now()
    res = absorb_chunk(model, W.groups(tok), cfg, log=rows.append)
    total = W.now() - t0
    if procs.master:
        st = W.step_times(rows)[1:] or W.step_times(rows)
        W.emit({"world": procs.world, "threads": args.threads, "steps": res.steps, "seconds": total,
                "step_times": st, "s_per_step": W.median(st), "first_loss": res.first_loss,
                "final_loss": res.final_loss})
    distributed.stop_processes(wait=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(procs: int, threads: int, steps: int) -> dict:
    me = [str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--steps", str(steps)]
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
                               str(free_port())] if procs > 1 else []) + me
    return W.run_worker(cmd, threads)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(HERE / "results" / "absorb_ddp.txt"))
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import time

    from nanoabsorber.io import atomic_write_text

    configs = [("1 process x 1 thread", 1, 1), (f"{args.procs} processes x 1 thread (torchrun, gloo)", args.procs, 1),
               (f"1 process x {args.procs} threads", 1, args.procs)]
    results = {c[0]: [] for c in configs}
    load0 = os.getloadavg()
    for rep in range(args.repeats):
        for name, procs, threads in configs:
            r = run(procs, threads, args.steps)
            results[name].append(r)
            print(f"[{rep + 1}/{args.repeats}] {name}: {r['s_per_step']:.2f} s/step "
                  f"(loss {r['first_loss']:.4f} -> {r['final_loss']:.4f})", flush=True)
    base = W.median([r["s_per_step"] for r in results[configs[0][0]]])
    lines = [f"# python bench/bench_absorb_ddp.py --steps {args.steps} --procs {args.procs} --repeats {args.repeats}",
             f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, load average before "
             f"{load0[0]:.2f} / after {os.getloadavg()[0]:.2f} (a shared machine: other work ran at the same time)",
             "# work: default model, X 512 tokens, Y 4 x 128, hidden-state L1, rank 16, all projections",
             "", "| configuration | s/step (median of runs) | each run | speed-up vs 1 x 1 | final loss |",
             "|---|---|---|---|---|"]
    for name, _, _ in configs:
        rs = results[name]
        s = W.median([r["s_per_step"] for r in rs])
        each = ", ".join(f"{r['s_per_step']:.2f}" for r in rs)
        lines.append(f"| {name} | {s:.2f} | {each} | {base / s:.2f}x | "
                     f"{rs[-1]['final_loss']:.5f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
