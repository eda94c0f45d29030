"""CPU benchmark: chunked linear-KL (nanoabsorber.losses.linear_kl_loss, PyTorch path) vs the unfused
reference (kernels.fused_linear_kl.linear_kl_reference), forward + backward.

Shape: N=4096 rows, vocab V=49152, hidden D=576, fp32; teacher given as hidden states (same W);
W frozen (as in the absorber, where the LoRA never touches the output head); --w-grad also
differentiates W.

How peak memory is measured: each variant runs in a FRESH subprocess (so neither sees the other's
allocator state). The child imports everything, allocates the inputs, runs a tiny warm-up on a small
slice (so one-time lazy allocations such as thread pools are not charged to the variant), then reads
resource.getrusage(RUSAGE_SELF).ru_maxrss (the process's peak resident set so far) as the baseline.
It then runs forward + backward `--iters` times and reads ru_maxrss again: peak - baseline is the
extra resident memory the loss needed at its worst moment (logits, softmax temporaries, saved
tensors, gradients). ru_maxrss is a high-water mark of pages actually touched, so it is an honest
upper bound of what the variant needed on top of its inputs. Large tensors are mmapped by the
allocator and returned to the OS when freed, so earlier iterations do not hide later peaks.
Time: wall-clock mean of the timed iterations (after one untimed iteration), with the same thread
count in both children.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(args) -> None:
    os.environ.setdefault("NANOABSORBER_QUIET", "1")
    import torch

    from kernels.fused_linear_kl import linear_kl_reference
    from nanoabsorber.losses import linear_kl_loss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    N, V, D = args.N, args.V, args.D
    h_s = torch.randn(N, D).requires_grad_()
    W = (torch.randn(V, D) * 0.05).requires_grad_(args.w_grad)
    h_t = torch.randn(N, D)
    inputs = (h_s, W) if args.w_grad else (h_s,)

    if args.variant == "chunked":
        def run(hs, w, ht):
            return linear_kl_loss(hs, w, teacher_h=ht, chunk_size=args.chunk, impl="torch")
    else:
        def run(hs, w, ht):
            return linear_kl_reference(hs, w, h_t=ht)

    # warm-up on a small slice: thread pools, kernels' first-call allocations
    small = run(h_s[:64], W[:512], h_t[:64])
    torch.autograd.grad(small, inputs)
    del small
    base = _rss_mib()

    times = []
    for i in range(args.iters + 1):
        t0 = time.perf_counter()
        loss = run(h_s, W, h_t)
        grads = torch.autograd.grad(loss, inputs)
        dt = time.perf_counter() - t0
        if i > 0:
            times.append(dt)
        value = loss.item()
        gnorm = grads[0].norm().item()
        del loss, grads
    peak = _rss_mib()
    print(json.dumps(dict(variant=args.variant, baseline_mib=base, peak_extra_mib=peak - base,
                          time_s=sum(times) / len(times), loss=value, grad_norm=gnorm)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--V", type=int, default=49152)
    p.add_argument("--D", type=int, default=576)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--w-grad", action="store_true", help="also differentiate the output head W")
    p.add_argument("--child", dest="variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        child(args)
        return

    common = ["--N", str(args.N), "--V", str(args.V), "--D", str(args.D), "--chunk", str(args.chunk),
              "--iters", str(args.iters), "--threads", str(args.threads)] + (["--w-grad"] if args.w_grad else [])
    print(f"linear-KL forward+backward on CPU, fp32, N={args.N} V={args.V} D={args.D}, chunk={args.chunk}, "
          f"W {'trainable' if args.w_grad else 'frozen'}, {args.threads} threads, {args.iters} timed iters; "
          f"full (N, V) fp32 logits = {args.N * args.V * 4 / 2**20:.0f} MiB")
    res = {}
    for variant in ("reference", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--child", variant] + common, capture_output=True,
                             text=True, check=True)
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'variant':<12}{'peak extra MiB':>16}{'time s':>10}{'loss':>14}{'|dh_s|':>14}")
    for variant, r in res.items():
        print(f"{variant:<12}{r['peak_extra_mib']:>16.0f}{r['time_s']:>10.2f}{r['loss']:>14.6f}{r['grad_norm']:>14.6e}")
    ref, ch = res["reference"], res["chunked"]
    print(f"peak memory ratio (reference / chunked): {ref['peak_extra_mib'] / max(ch['peak_extra_mib'], 1e-9):.2f}x")
    print(f"time ratio (reference / chunked): {ref['time_s'] / ch['time_s']:.2f}x  (>1 means chunked is faster)")
    print(f"|loss diff| = {abs(ref['loss'] - ch['loss']):.2e}, "
          f"rel |dh_s| diff = {abs(ref['grad_norm'] - ch['grad_norm']) / ref['grad_norm']:.2e}")


if __name__ == "__main__":
    main()
