"""Triton flash attention vs the plain PyTorch reference: outputs and dq, dk, dv.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py) in
fp32, where tl.dot is exact, so the fp32 tolerances are tight. The fp16/bf16 entries are used only by
the CUDA tests (skipped without a GPU; they are not CPU coverage).
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.flash_attention import attention_reference, flash_attention
from nanoabsorber.attention import attention

# dtype -> tolerance, for outputs and gradients against the fp32 reference
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),  # interpreter (exact fp32 dots); CUDA fp32 uses "ieee" dots
    torch.float16: dict(atol=2e-2, rtol=2e-2),  # CUDA only
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),  # CUDA only
}

CUDA = torch.cuda.is_available()


def _inputs(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(B, Hkv, Tk, D, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(device, dtype).requires_grad_()
    do = torch.randn(B, Hq, Tq, D, generator=g).to(device, dtype)
    return q, k, v, do


def _check(B, Hq, Hkv, Tq, Tk, D, causal, dtype=torch.float32, device="cpu", sm_scale=None, seed=0):
    q, k, v, do = _inputs(B, Hq, Hkv, Tq, Tk, D, dtype, device, seed)
    out = flash_attention(q, k, v, causal=causal, sm_scale=sm_scale)
    assert out.shape == q.shape and out.dtype == dtype
    grads = torch.autograd.grad(out, (q, k, v), do)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention_reference(qf, kf, vf, causal=causal, sm_scale=sm_scale)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), do.float())
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, **tol)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b, **tol, msg=lambda m: f"{name}: {m}")


# (B, Hq, Hkv, Tq, Tk, D, causal): odd lengths (masked tails), GQA ratios 1/2/3/4, Tq < Tk (KV cache)
CASES = [
    (1, 2, 2, 37, 37, 16, True),
    (1, 2, 2, 37, 37, 16, False),
    (1, 3, 1, 100, 100, 16, True),  # GQA 3
    (1, 4, 1, 129, 129, 16, False),  # GQA 4
    (2, 4, 1, 37, 129, 16, True),  # GQA 4, Tq < Tk, bottom-right causal
    (1, 4, 2, 37, 100, 64, True),  # GQA 2, Tq < Tk, head dim 64
    (1, 3, 1, 1, 129, 64, True),  # single decode query, GQA 3
    (1, 3, 1, 20, 129, 16, False),  # Tq < Tk non-causal
    (1, 2, 2, 129, 129, 64, True),
    (1, 2, 1, 37, 37, 24, True),  # head dim 24, padded to 32 with masks
]


@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,causal", CASES)
def test_matches_reference(B, Hq, Hkv, Tq, Tk, D, causal):
    _check(B, Hq, Hkv, Tq, Tk, D, causal)


def test_custom_scale():
    _check(1, 2, 1, 37, 37, 16, True, sm_scale=0.3)


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    g=st.sampled_from([1, 3, 4]),
    Tk=st.integers(1, 70),
    dq=st.integers(0, 69),
    D=st.sampled_from([16, 32]),
    causal=st.booleans(),
)
def test_hypothesis_shapes(B, Hkv, g, Tk, dq, D, causal):
    Tq = max(1, Tk - dq)
    _check(B, g * Hkv, Hkv, Tq, Tk, D, causal, seed=Tk * 131 + Tq)


def test_non_contiguous_inputs():
    # (B, T, H, D) storage viewed as (B, H, T, D), as a model's projections produce it
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 37, 4, 16, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 37, 2, 16, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(1, 37, 2, 16, generator=g).transpose(1, 2).requires_grad_()
    out = flash_attention(q, k, v, causal=True)
    ref = attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    do = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_rows_sum_to_one_values():
    # with v = 1 every output is exactly 1 (softmax rows sum to 1), incl. masked tails and GQA
    q = torch.randn(1, 4, 37, 16)
    k = torch.randn(1, 1, 100, 16)
    v = torch.ones(1, 1, 100, 16)
    out = flash_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, torch.ones_like(out), atol=1e-5, rtol=0)


def test_causal_more_queries_than_keys_raises():
    q = torch.randn(1, 1, 20, 16)
    k = torch.randn(1, 1, 10, 16)
    with pytest.raises(ValueError):
        flash_attention(q, k, k, causal=True)


def test_reference_matches_sdpa():
    # guards the reference itself (bottom-right mask, GQA) against torch SDPA
    q, k, v, _ = _inputs(1, 4, 2, 37, 100, 16)
    for causal in (True, False):
        ref = attention_reference(q, k, v, causal=causal)
        sdpa = attention(q, k, v, causal=causal, impl="sdpa")
        torch.testing.assert_close(ref, sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Hq,Hkv,Tq,Tk,causal", [(4, 1, 37, 37, True), (3, 1, 37, 100, True), (2, 2, 1, 37, True),
                                                 (4, 2, 37, 100, False)])
def test_dispatch_triton_equals_sdpa(Hq, Hkv, Tq, Tk, causal):
    q, k, v, do = _inputs(1, Hq, Hkv, Tq, Tk, 16)
    a = attention(q, k, v, causal=causal, impl="triton")
    b = attention(q, k, v, causal=causal, impl="sdpa")
    torch.testing.assert_close(a, b, **TOL[torch.float32])
    ga = torch.autograd.grad(a, (q, k, v), do)
    gb = torch.autograd.grad(b, (q, k, v), do)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, **TOL[torch.float32])


def test_low_precision_input_in_interpreter_keeps_dtype():
    q, k, v, _ = _inputs(1, 2, 1, 37, 37, 16, dtype=torch.bfloat16)
    out = flash_attention(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attention_reference(q, k, v).float(), **TOL[torch.bfloat16])


# ------------------------------- CUDA only (not CPU coverage) -------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,causal", [
    (2, 8, 2, 1000, 1000, 64, True),
    (2, 8, 8, 1000, 1000, 128, False),
    (1, 12, 4, 300, 1111, 128, True),
    (1, 6, 2, 1, 777, 64, True),
    (1, 4, 1, 129, 129, 32, True),
])
def test_cuda_low_precision(dtype, B, Hq, Hkv, Tq, Tk, D, causal):
    _check(B, Hq, Hkv, Tq, Tk, D, causal, dtype=dtype, device="cuda")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_fp32_ieee():
    _check(1, 4, 2, 200, 300, 64, True, dtype=torch.float32, device="cuda")


def test_default_scale_is_inverse_sqrt_d():
    q, k, v, _ = _inputs(1, 1, 1, 20, 20, 16)
    a = flash_attention(q, k, v, causal=False)
    b = flash_attention(q, k, v, causal=False, sm_scale=1 / math.sqrt(16))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
