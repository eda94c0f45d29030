"""The one dispatch point for attention.

attention(q, k, v, causal) with q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D), Hq % Hkv == 0.
When Tq < Tk and causal, the queries are the *last* Tq positions of the key sequence
(bottom-right aligned mask), which is what decoding with a KV cache needs.

Paths: "sdpa" (torch scaled_dot_product_attention, any device) and "triton" (our kernel in
kernels/flash_attention.py, CUDA, or the CPU interpreter when TRITON_INTERPRET=1 for tests).
Default "auto" = sdpa; set_attention_impl("triton") or NANOABSORBER_ATTN=triton asks for Triton.
"""
import os
import sys

import torch
import torch.nn.functional as F

_IMPL = os.environ.get("NANOABSORBER_ATTN", "auto")
_SAID = set()


def set_attention_impl(impl: str) -> None:
    global _IMPL
    if impl not in ("auto", "sdpa", "triton"):
        raise ValueError(f"attention impl must be auto, sdpa or triton, not {impl!r}")
    _IMPL = impl


def say_once(msg: str) -> None:
    """Print '[nanoabsorber] msg' to stderr the first time only (silenced by NANOABSORBER_QUIET)."""
    if msg not in _SAID and not os.environ.get("NANOABSORBER_QUIET"):
        print(f"[nanoabsorber] {msg}", file=sys.stderr)
    _SAID.add(msg)


def attention_sdpa(q, k, v, causal=True):
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    gqa = Hq != k.shape[1]
    if not causal or Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # bottom-right aligned causal mask: query i sits at key position Tk - Tq + i
    qpos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
    kpos = torch.arange(Tk, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=kpos <= qpos, enable_gqa=gqa)


def attention(q, k, v, causal=True, impl=None):
    impl = impl or _IMPL
    if impl == "auto":
        impl = "sdpa"
    if impl == "triton":
        from kernels.flash_attention import flash_attention

        say_once(f"attention: Triton flash attention on {q.device.type}")
        return flash_attention(q, k, v, causal=causal)
    say_once(f"attention: torch SDPA on {q.device.type}")
    return attention_sdpa(q, k, v, causal=causal)
