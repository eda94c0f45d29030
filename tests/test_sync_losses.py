"""Sync distance and fused linear-KL kernels vs their plain PyTorch references (values and grads),
plus the nanoabsorber.losses dispatch.

CPU: the Triton kernels run under the interpreter (TRITON_INTERPRET=1 from conftest.py) in fp32; the
chunked PyTorch KL path is the CPU default. The fp16/bf16 entries of the table are used only by the
CUDA tests (skipped without a GPU; not CPU coverage).
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.fused_linear_kl import fused_linear_kl, kl_rows_torch, kl_rows_triton, linear_kl_reference
from kernels.sync_distance import sync_distance, sync_distance_reference
from nanoabsorber import losses
from nanoabsorber.losses import hidden_sync_loss, linear_kl_loss, set_loss_impl

# dtype -> tolerance for values and gradients against the fp32 reference
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),  # interpreter / CPU
    torch.float16: dict(atol=1e-3, rtol=2e-2),  # CUDA only
    torch.bfloat16: dict(atol=1e-2, rtol=5e-2),  # CUDA only
}
KINDS = ["l1", "mse", "l1_norm"]
V, D = 1271, 67  # odd vocab and hidden size
CUDA = torch.cuda.is_available()
UPSTREAM = 3.7  # upstream gradient != 1 everywhere


def _close(a, b, dtype=torch.float32, what=""):
    torch.testing.assert_close(a.float(), b.float(), **TOL[dtype], msg=lambda m: f"{what}: {m}")


# ------------------------------------------ sync distance -----------------------------------------
def _sync_check(L, N, Dh, kind, weights=None, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(L, N, Dh, generator=g).to(device, dtype).requires_grad_()
    T = torch.randn(L, N, Dh, generator=g).to(device, dtype)
    T[:, :3] = S.detach()[:, :3]  # exact ties: the L1 gradient must be 0 there
    val = sync_distance(S, T, kind, weights)
    (dS,) = torch.autograd.grad(val * UPSTREAM, S)
    Sf = S.detach().float().requires_grad_()
    ref = sync_distance_reference(Sf, T.float(), kind, weights)
    (dS_ref,) = torch.autograd.grad(ref * UPSTREAM, Sf)
    _close(val, ref, dtype, f"{kind} value")
    assert dS.dtype == dtype and dS.shape == S.shape
    _close(dS, dS_ref, dtype, f"{kind} dS")
    if kind != "mse":
        assert (dS[:, :3] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("L,N,Dh", [(3, 37, 67), (2, 129, 67), (5, 100, 16)])
def test_sync_matches_reference(kind, L, N, Dh):
    _sync_check(L, N, Dh, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_sync_weighted(kind):
    w = torch.rand(37, generator=torch.Generator().manual_seed(3))
    w[5] = 0.0
    _sync_check(3, 37, 67, kind, weights=w)


def test_sync_uniform_weights_equal_unweighted():
    S = torch.randn(2, 37, 67)
    T = torch.randn(2, 37, 67)
    for kind in KINDS:
        a = sync_distance(S, T, kind)
        b = sync_distance(S, T, kind, weights=torch.full((37,), 2.5))
        _close(a, b, what=kind)


def test_sync_closed_forms():
    S = torch.randn(3, 37, 67)
    T = torch.randn(3, 37, 67)
    _close(sync_distance(S, T, "l1"), (S - T).abs().mean())
    _close(sync_distance(S, T, "mse"), F.mse_loss(S, T))
    per_layer = torch.stack([(S[l] - T[l]).abs().sum() / (T[l].abs().sum() + 1e-6) for l in range(3)])
    _close(sync_distance(S, T, "l1_norm"), per_layer.mean())
    for kind in KINDS:
        assert sync_distance(S, S.clone(), kind).item() == 0.0


@settings(max_examples=10, deadline=None)
@given(L=st.integers(1, 4), N=st.integers(1, 80), Dh=st.integers(1, 70), kind=st.sampled_from(KINDS),
       weighted=st.booleans())
def test_sync_hypothesis(L, N, Dh, kind, weighted):
    w = torch.rand(N, generator=torch.Generator().manual_seed(N)) + 0.1 if weighted else None
    _sync_check(L, N, Dh, kind, weights=w, seed=L * 1000 + N)


# ------------------------------------------ linear KL ---------------------------------------------
def _kl_inputs(N, seed=0, device="cpu", dtype=torch.float32, w_grad=True):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_()
    W = (torch.randn(V, D, generator=g) * 0.3).to(device, dtype).requires_grad_(w_grad)
    h_t = torch.randn(N, D, generator=g).to(device, dtype)
    return h_s, W, h_t


def _kl_check(N, use_triton, temperature=1.0, chunk=32, teacher="hidden", w_grad=True, dtype=torch.float32,
              device="cpu", seed=0):
    h_s, W, h_t = _kl_inputs(N, seed, device, dtype, w_grad)
    if teacher == "hidden":
        kw = dict(h_t=h_t)
    else:  # log-probabilities at a different temperature than the loss uses
        kw = dict(teacher_logp=F.log_softmax((h_t @ W.detach().t()).float() * 1.3, -1).to(dtype))
    inputs = (h_s, W) if w_grad else (h_s,)
    loss = fused_linear_kl(h_s, W, temperature=temperature, chunk_size=chunk, use_triton=use_triton, **kw)
    grads = torch.autograd.grad(loss * UPSTREAM, inputs)
    hs_f, W_f = h_s.detach().float().requires_grad_(), W.detach().float().requires_grad_(w_grad)
    kw_f = {k: v.float() for k, v in kw.items()}
    ref = linear_kl_reference(hs_f, W_f, temperature=temperature, **kw_f)
    ref_grads = torch.autograd.grad(ref * UPSTREAM, (hs_f, W_f) if w_grad else (hs_f,))
    _close(loss, ref, dtype, "loss")
    for name, a, b in zip(("dh_s", "dW"), grads, ref_grads):
        assert a.dtype == dtype
        _close(a, b, dtype, name)
    return loss


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("N,chunk,temperature,teacher", [
    (37, 16, 1.0, "hidden"),
    (100, 32, 2.5, "hidden"),
    (129, 1024, 0.7, "logp"),  # one chunk bigger than N
    (100, 33, 1.0, "logp"),
])
def test_linear_kl_matches_reference(use_triton, N, chunk, temperature, teacher):
    _kl_check(N, use_triton, temperature, chunk, teacher)


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_linear_kl_frozen_weight(use_triton):
    _kl_check(37, use_triton, 1.5, 16, "hidden", w_grad=False)


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_kl_of_distribution_with_itself_is_zero(use_triton):
    h_s, W, _ = _kl_inputs(37)
    loss = fused_linear_kl(h_s, W, h_t=h_s.detach(), chunk_size=16, use_triton=use_triton)
    assert abs(loss.item()) < 1e-6
    (dh,) = torch.autograd.grad(loss, h_s)
    assert dh.abs().max().item() < 1e-6


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_teacher_logp_with_minus_inf(use_triton):
    h_s, W, h_t = _kl_inputs(37)
    logp = F.log_softmax(h_t @ W.detach().t(), -1)
    logp[:, 100:300] = float("-inf")  # masked vocabulary entries: p_t = 0, contribute 0
    logp = logp - torch.logsumexp(logp, -1, keepdim=True)
    loss = fused_linear_kl(h_s, W, teacher_logp=logp, chunk_size=16, use_triton=use_triton)
    logp_s = F.log_softmax(h_s @ W.t(), -1)
    p_t = logp.exp()
    explicit = torch.where(p_t > 0, p_t * (logp - logp_s), torch.zeros_like(p_t)).sum(-1).mean()
    assert torch.isfinite(loss)
    _close(loss, explicit)
    ga = torch.autograd.grad(loss, (h_s, W))
    gb = torch.autograd.grad(explicit, (h_s, W))
    for a, b in zip(ga, gb):
        _close(a, b)


@settings(max_examples=10, deadline=None)
@given(N=st.integers(1, 40), Vh=st.integers(2, 300), temperature=st.floats(0.3, 4.0), chunk=st.integers(1, 50),
       scale=st.floats(0.01, 3.0))
def test_kl_nonnegative_and_chunked_equals_reference(N, Vh, temperature, chunk, scale):
    g = torch.Generator().manual_seed(N * 7 + Vh)
    h_s = torch.randn(N, 16, generator=g).requires_grad_()
    W = torch.randn(Vh, 16, generator=g) * scale
    h_t = torch.randn(N, 16, generator=g)
    loss = fused_linear_kl(h_s, W, h_t=h_t, temperature=temperature, chunk_size=chunk, use_triton=False)
    ref = linear_kl_reference(h_s, W, h_t=h_t, temperature=temperature)
    assert loss.item() >= -1e-6
    _close(loss, ref)
    _close(torch.autograd.grad(loss, h_s)[0], torch.autograd.grad(ref, h_s)[0])


def test_kl_rows_kernel_equals_torch_rows():
    g = torch.Generator().manual_seed(5)
    zs = torch.randn(13, V, generator=g) * 3
    zt = torch.randn(13, V, generator=g) * 3
    loss_t, grad_t = kl_rows_torch(zs.clone(), zt, 1.7, 0.25, True)
    buf = zs.clone()
    loss_k = kl_rows_triton(buf, zt, 1.7, 0.25, True)
    _close(loss_k, loss_t)
    _close(buf, grad_t)  # the kernel overwrote the student logits with the grad of the logits
    assert (loss_k >= -1e-6).all()


def test_teacher_logp_is_not_modified():
    h_s, W, h_t = _kl_inputs(37)
    logp = F.log_softmax(h_t @ W.detach().t(), -1)
    before = logp.clone()
    for tr in (False, True):
        fused_linear_kl(h_s, W, teacher_logp=logp, temperature=2.0, chunk_size=16, use_triton=tr)
    assert torch.equal(logp, before)


def test_no_grad_mode_values():
    h_s, W, h_t = _kl_inputs(37)
    S = torch.randn(2, 37, 67, requires_grad=True)
    T = torch.randn(2, 37, 67)
    with torch.no_grad():
        ref_kl = linear_kl_reference(h_s, W, h_t=h_t, temperature=1.3)
        for tr in (False, True):
            val = fused_linear_kl(h_s, W, h_t=h_t, temperature=1.3, chunk_size=16, use_triton=tr)
            assert not val.requires_grad
            _close(val, ref_kl)
        for kind in KINDS:
            _close(sync_distance(S, T, kind), sync_distance_reference(S, T, kind), what=kind)


# ------------------------------------------ dispatch ----------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_dispatch_sync_torch_equals_triton(kind):
    S = torch.randn(3, 37, 67, requires_grad=True)
    T = torch.randn(3, 37, 67)
    a = hidden_sync_loss(S, T, kind, impl="torch")
    b = hidden_sync_loss(S, T, kind, impl="triton")
    _close(a, b, what=kind)
    _close(torch.autograd.grad(a * UPSTREAM, S)[0], torch.autograd.grad(b * UPSTREAM, S)[0], what=kind)


def test_dispatch_kl_torch_equals_triton_and_auto():
    h_s, W, h_t = _kl_inputs(37)
    a = linear_kl_loss(h_s, W, teacher_h=h_t, temperature=2.0, chunk_size=16, impl="torch")
    b = linear_kl_loss(h_s, W, teacher_h=h_t, temperature=2.0, chunk_size=16, impl="triton")
    c = linear_kl_loss(h_s, W, teacher_h=h_t, temperature=2.0, chunk_size=16, impl="auto")  # CPU -> torch
    _close(a, b)
    _close(a, c)
    for x, y in zip(torch.autograd.grad(a * UPSTREAM, (h_s, W)), torch.autograd.grad(b * UPSTREAM, (h_s, W))):
        _close(x, y)


def test_set_loss_impl_and_validation(monkeypatch):
    old = losses._IMPL
    try:
        set_loss_impl("auto")
        assert losses._resolve(None, torch.zeros(1)) == "torch"             # auto on a CPU tensor
        set_loss_impl("triton")
        assert losses._resolve(None, torch.zeros(1)) == "triton"
        set_loss_impl("auto")
        assert losses._resolve(None, torch.zeros(1)) == "torch"
        with pytest.raises(ValueError):
            set_loss_impl("cuda")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError):
            losses._resolve("triton", torch.zeros(1))
    finally:
        losses._IMPL = old


def test_dispatch_prints_once(monkeypatch, capsys):
    monkeypatch.delenv("NANOABSORBER_QUIET", raising=False)
    import nanoabsorber.attention as attention

    monkeypatch.setattr(attention, "_SAID", set())
    S = torch.randn(2, 5, 16)
    hidden_sync_loss(S, S + 1, impl="torch")
    hidden_sync_loss(S, S + 1, impl="torch")
    err = capsys.readouterr().err
    assert err.count("[nanoabsorber] hidden_sync_loss: PyTorch") == 1


# ------------------------------- CUDA only (not CPU coverage) -------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_sync(dtype, kind):
    _sync_check(5, 300, 256, kind, dtype=dtype, device="cuda")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_linear_kl(dtype):
    _kl_check(300, True, 1.5, 128, "hidden", dtype=dtype, device="cuda")
