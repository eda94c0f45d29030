"""GPU benchmark (CUDA only): our Triton kernels vs PyTorch, side by side in one run.

1. Attention, causal, bf16, B=4, H=16, T in {1024, 4096, 8192}, D in {64, 128}: forward and
   forward+backward TFLOP/s of kernels.flash_attention.flash_attention and of torch SDPA restricted
   to its FlashAttention backend (torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)).
   FLOPs: forward 4 B H T^2 D (two matmuls), halved for causal; forward+backward = 3.5x forward
   (backward does five matmuls of the same size). The first call of each shape autotunes (Hopper
   sweep: BLOCK_M 64/128, BLOCK_N 32/64/128, num_warps 4/8, num_stages 2-4) and is not timed.
2. Fused linear-KL (bf16, N=4096, D=1024, V in {32000, 128256}, W frozen): time of forward+backward
   and peak extra CUDA memory (torch.cuda.max_memory_allocated above the inputs) of
   nanoabsorber.losses.linear_kl_loss(impl="triton") vs the unfused linear_kl_reference.

Everything is checked against the plain PyTorch references once before timing; the run stops on a
mismatch. Usage: python bench/bench_attention_gpu.py [--quick]
"""
import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

if not torch.cuda.is_available():
    sys.exit("bench_attention_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to do.")
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("unset TRITON_INTERPRET: this benchmark times the compiled GPU kernels.")
os.environ.setdefault("NANOABSORBER_QUIET", "1")

import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from kernels.flash_attention import attention_reference, flash_attention  # noqa: E402
from kernels.fused_linear_kl import linear_kl_reference  # noqa: E402
from nanoabsorber.losses import linear_kl_loss  # noqa: E402

DEV = "cuda"


def sdpa_flash(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def check_attention():
    """bf16 kernel vs fp32 reference (outputs and grads): MHA, GQA 4, KV-cache queries, D 64 and 128."""
    ok = True
    for (B, Hq, Hkv, Tq, Tk, D) in [(1, 4, 4, 1000, 1000, 64), (1, 8, 2, 1000, 1000, 128), (2, 6, 2, 300, 1111, 128)]:
        g = torch.Generator(device=DEV).manual_seed(0)
        q = torch.randn(B, Hq, Tq, D, device=DEV, generator=g, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, Hkv, Tk, D, device=DEV, generator=g, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, Hkv, Tk, D, device=DEV, generator=g, dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn(B, Hq, Tq, D, device=DEV, generator=g, dtype=torch.bfloat16)
        out = flash_attention(q, k, v, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), do)
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = attention_reference(qf, kf, vf, causal=True)
        ref_grads = torch.autograd.grad(ref, (qf, kf, vf), do.float())
        errs = [_max_err(out, ref)] + [_max_err(a, b) for a, b in zip(grads, ref_grads)]
        scales = [ref.abs().max().item()] + [b.abs().max().item() for b in ref_grads]
        good = all(e <= 0.02 * max(s, 1.0) for e, s in zip(errs, scales))
        ok &= good
        print(f"  check attention B={B} Hq={Hq} Hkv={Hkv} Tq={Tq} Tk={Tk} D={D}: max err o/dq/dk/dv = "
              + "/".join(f"{e:.2e}" for e in errs) + ("  OK" if good else "  FAIL"))
    return ok


def bench_attention(Ts, Ds, B=4, H=16):
    print(f"\nattention, causal, bf16, B={B}, H={H} (TFLOP/s; ratio = ours / SDPA flash)")
    print(f"{'T':>6} {'D':>4} | {'fwd ours':>9} {'fwd sdpa':>9} {'ratio':>6} | {'f+b ours':>9} {'f+b sdpa':>9} {'ratio':>6}")
    for D in Ds:
        for T in Ts:
            q, k, v = (torch.randn(B, H, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            do = torch.randn_like(q)
            fwd_flops = 4 * B * H * T * T * D * 0.5
            res = {}
            for name, fn in (("ours", lambda: flash_attention(q, k, v, causal=True)), ("sdpa", lambda: sdpa_flash(q, k, v))):
                def fwd():
                    return fn()

                def fwdbwd():
                    return torch.autograd.grad(fn(), (q, k, v), do)

                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    fwdbwd()  # autotune / warm up outside the timing
                    t_f = triton.testing.do_bench(fwd, warmup=25, rep=100)
                    t_fb = triton.testing.do_bench(fwdbwd, warmup=25, rep=100)
                res[name] = (fwd_flops / t_f * 1e-9, 3.5 * fwd_flops / t_fb * 1e-9)  # ms -> TFLOP/s
            (fo, fbo), (fs, fbs) = res["ours"], res["sdpa"]
            print(f"{T:>6} {D:>4} | {fo:>9.1f} {fs:>9.1f} {fo / fs:>6.2f} | {fbo:>9.1f} {fbs:>9.1f} {fbo / fbs:>6.2f}")
            del q, k, v, do
            torch.cuda.empty_cache()


def check_linear_kl():
    """fp32 check on a smaller N (exact math), then bf16 agreement at the benchmark shape is printed later."""
    g = torch.Generator(device=DEV).manual_seed(0)
    N, D, V = 512, 1024, 32000
    h_s = torch.randn(N, D, device=DEV, generator=g, requires_grad=True)
    W = torch.randn(V, D, device=DEV, generator=g) * 0.02
    h_t = torch.randn(N, D, device=DEV, generator=g)
    a = linear_kl_loss(h_s, W, teacher_h=h_t, temperature=1.5, chunk_size=128, impl="triton")
    ga = torch.autograd.grad(a * 3.7, h_s)[0]
    b = linear_kl_reference(h_s, W, h_t=h_t, temperature=1.5)
    gb = torch.autograd.grad(b * 3.7, h_s)[0]
    e_l, e_g = abs(a.item() - b.item()), _max_err(ga, gb)
    good = e_l <= 1e-4 * max(1.0, abs(b.item())) and e_g <= 1e-3 * gb.abs().max().item() + 1e-7
    print(f"  check linear-KL fp32 N={N} D={D} V={V}: |loss err| {e_l:.2e}, max |dh err| {e_g:.2e}"
          + ("  OK" if good else "  FAIL"))
    return good


def bench_linear_kl(Vs, N=4096, D=1024):
    print(f"\nfused linear-KL forward+backward, bf16, N={N}, D={D}, W frozen, chunk 1024")
    print(f"{'V':>7} | {'ms fused':>9} {'ms unfused':>10} {'speedup':>8} | {'MiB fused':>10} {'MiB unfused':>11} {'mem ratio':>9} | {'loss fused':>11} {'loss unfused':>12}")
    for V in Vs:
        g = torch.Generator(device=DEV).manual_seed(0)
        h_s = torch.randn(N, D, device=DEV, generator=g, dtype=torch.bfloat16, requires_grad=True)
        W = (torch.randn(V, D, device=DEV, generator=g) * 0.02).to(torch.bfloat16)
        h_t = torch.randn(N, D, device=DEV, generator=g, dtype=torch.bfloat16)
        variants = {
            "fused": lambda: linear_kl_loss(h_s, W, teacher_h=h_t, impl="triton"),
            "unfused": lambda: linear_kl_reference(h_s, W, h_t=h_t),
        }
        res = {}
        for name, fn in variants.items():
            def step():
                loss = fn()
                torch.autograd.grad(loss, h_s)
                return loss

            loss = step()  # warm-up
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms = triton.testing.do_bench(step, warmup=5, rep=50)
            res[name] = (ms, peak, loss.item())
        (mf, pf, lf), (mu, pu, lu) = res["fused"], res["unfused"]
        print(f"{V:>7} | {mf:>9.2f} {mu:>10.2f} {mu / mf:>8.2f} | {pf:>10.0f} {pu:>11.0f} {pu / pf:>9.2f} | {lf:>11.5f} {lu:>12.5f}")
        del h_s, W, h_t
        torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T in {1024, 4096}, D 128 only, V 32000 only")
    args = p.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    ok = check_attention() & check_linear_kl()
    if not ok:
        sys.exit("correctness check FAILED; not timing")
    Ts, Ds, Vs = ([1024, 4096], [128], [32000]) if args.quick else ([1024, 4096, 8192], [64, 128], [32000, 128256])
    bench_attention(Ts, Ds)
    bench_linear_kl(Vs)


if __name__ == "__main__":
    main()
