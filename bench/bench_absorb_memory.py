"""Memory of absorption: peak memory and seconds per step, the default against memory modes
(--modes: "ckpt" = AbsorbConfig.checkpoint_activations, "micro:N" = AbsorbConfig.micro_tokens N,
"bf16" = bfloat16 base weights with fp32 LoRA, joined by "+" to combine), against the Y tokens per step, on the same work
(bench/absorb_work.py: default model, X 512 tokens, Y n x 128, hidden-state L1, rank 16, all
projections). Each point runs in a fresh process (so no earlier run pollutes the high-water
mark); memory is nanoabsorber.cost.PeakMemory over the absorption alone: RSS high-water (VmHWM,
reset after the model is loaded and paged in) on CPU, max_memory_allocated on CUDA.

On CPU the RSS high-water mark also counts memory the C allocator keeps after PyTorch frees it:
glibc raises its mmap threshold as large blocks are freed, so later tensors come from a heap that
is not given back, and the high-water mark then measures fragmentation as much as live tensors.
--malloc fixed (the default here) pins the threshold (MALLOC_MMAP_THRESHOLD_=65536) so freed
tensors leave the RSS; --malloc default measures glibc as it comes.

    python bench/bench_absorb_memory.py [--ys 1,2,4] [--modes ckpt,micro:128] [--steps 4] [--threads 1]
        [--device cpu] [--dtype float32] [--malloc fixed|default] [--out bench/results/absorb_memory.txt]
"""
import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import absorb_work as W  # noqa: E402


def worker(args) -> None:
    import torch

    from nanoabsorber import load
    from nanoabsorber.absorber import absorb_chunk
    from nanoabsorber.cost import PeakMemory
    from nanoabsorber.lora import apply_lora

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ckpt, micro, dtype = parse_mode(args.mode)
    model, tok = load(device=args.device, dtype=getattr(torch, dtype or args.dtype))  # LoRA stays fp32
    with torch.no_grad():  # page in every weight, initialise the math libraries
        model(torch.zeros((1, 8), dtype=torch.long, device=args.device))
    cfg = W.config(steps=args.steps, checkpoint_activations=ckpt, **({"micro_tokens": micro} if micro else {}))
    apply_lora(model, cfg.lora)
    g = W.groups(tok, n_y=args.n_y)
    rows = []
    with PeakMemory(args.device) as mem:
        res = absorb_chunk(model, g, cfg, log=rows.append)
    st = W.step_times(rows)[1:] or W.step_times(rows)
    W.emit({"y_tokens": sum(len(y) for y in g[0][2]), "mode": args.mode, "steps": res.steps,
            "s_per_step": W.median(st), "step_times": st, "final_loss": res.final_loss, **mem.as_dict()})


def parse_mode(mode: str) -> tuple[bool, int | None, str | None]:
    """"default" or "+"-joined parts "ckpt", "micro:N", "bf16" ->
    (checkpoint_activations, micro_tokens or None, base dtype or None (= --dtype))."""
    ckpt, micro, dtype = False, None, None
    for part in mode.split("+"):
        if part == "ckpt":
            ckpt = True
        elif part in ("bf16", "fp16"):
            dtype = {"bf16": "bfloat16", "fp16": "float16"}[part]
        elif part.startswith("micro:") and part[6:].isdigit() and int(part[6:]) > 0:
            micro = int(part[6:])
        elif part != "default":
            raise SystemExit(f"error: --modes: unknown mode {mode!r} (default, or parts ckpt, micro:N, bf16, fp16 "
                             f"joined by +)")
    return ckpt, micro, dtype


def run(n_y: int, mode: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--n-y", str(n_y), "--steps", str(args.steps),
           "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype, "--mode", mode]
    return W.run_worker(cmd, args.threads, {"MALLOC_MMAP_THRESHOLD_": "65536"} if args.malloc == "fixed" else None)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ys", default="1,2,4", help="Y sequences of 128 tokens per step, comma list")
    p.add_argument("--reference", default="micro:4096",
                   help="the mode the ratios are against: by default one forward/backward pass over all of a "
                        "step's Y (how absorption ran before AbsorbConfig.micro_tokens)")
    p.add_argument("--modes", default="default,micro:128,ckpt,ckpt+micro:128,bf16+micro:128",
                   help="modes measured against --reference: default (today's AbsorbConfig), or parts ckpt, "
                        "micro:N, bf16, fp16 joined by +; comma list")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--malloc", default="fixed", choices=("fixed", "default"),
                   help="CPU: pin glibc's mmap threshold (fixed) or leave it (default); see above")
    p.add_argument("--out", default=str(HERE / "results" / "absorb_memory.txt"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n-y", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="default", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import time

    from nanoabsorber.io import atomic_write_text

    mib = 2 ** 20
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in [args.reference] + modes:
        parse_mode(m)
    load0 = os.getloadavg()
    rows = []
    for n_y in [int(v) for v in args.ys.split(",")]:
        group = []
        for mode in [args.reference] + modes:  # side by side: every mode back to back at each size
            r = run(n_y, mode, args)
            group.append(r)
            print(f"Y {r['y_tokens']} tokens, {mode}: peak {r['memory_peak_bytes'] / mib:.0f} MiB (extra "
                  f"{r['memory_extra_bytes'] / mib:.0f}), {r['s_per_step']:.2f} s/step", flush=True)
        rows.append(group)
    kind = rows[0][0]["memory_kind"]
    lines = [f"# python bench/bench_absorb_memory.py --ys {args.ys} --reference {args.reference} --modes {args.modes} "
             f"--steps {args.steps} "
             f"--threads {args.threads} --device {args.device} --dtype {args.dtype} --malloc {args.malloc}",
             f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, load average before {load0[0]:.2f} / "
             f"after {os.getloadavg()[0]:.2f} (a shared machine: other work may run at the same time)",
             "# work: default model, X 512 tokens, Y n x 128, hidden-state L1, rank 16, all projections; "
             f"memory: {kind}; extra = above the loaded model; s/step = median after the first step; "
             f"ratios against {args.reference} at the same Y", "",
             "| Y tokens / step | mode | peak MiB | extra MiB | peak ratio | extra ratio | s/step | time ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for group in rows:
        d = group[0]
        for r in group:
            lines.append(f"| {r['y_tokens']} | {r['mode']} | {r['memory_peak_bytes'] / mib:.0f} | "
                         f"{r['memory_extra_bytes'] / mib:.0f} | {r['memory_peak_bytes'] / d['memory_peak_bytes']:.2f}x | "
                         f"{r['memory_extra_bytes'] / max(d['memory_extra_bytes'], 1):.2f}x | {r['s_per_step']:.2f} | "
                         f"{r['s_per_step'] / d['s_per_step']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
