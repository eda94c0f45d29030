"""Fused output-head linear + KL(teacher || student), chunked over rows (Liger-Kernel style).

Inputs: student hidden states h_s (N, D), the output head W (V, D), and the teacher either as hidden
states h_t (N, D) (teacher logits = h_t @ W^T with the same W) or as log-probabilities (N, V).
With temperature tau and z = logits / tau:

    p_t = softmax(z_t),  p_s = softmax(z_s)
    loss = (1/N) sum_n KL(p_t,n || p_s,n) = (1/N) sum_n sum_v p_t (log p_t - log p_s)

No tau^2 factor is applied (Hinton-style distillation multiplies by tau^2 to keep gradient scale
constant across temperatures; multiply the result yourself if you want that). Teacher
log-probabilities are treated as logits (they differ from logits by a per-row constant, which the
softmax removes), so the temperature acts on them the same way; at tau = 1 p_t = exp(teacher_logp).
Teacher entries of -inf (p_t = 0) contribute 0 to the KL.

Gradient (teacher side has none):
    d loss / d logits_s = (p_s - p_t) / (tau * N)
    d loss / d h_s = (d loss / d logits_s) @ W,      d loss / d W = (d loss / d logits_s)^T @ h_s

Memory: rows are processed in chunks of `chunk_size`; for each chunk the student logits (chunk, V)
and the teacher logits (chunk, V) are formed, reduced to per-row KL, and overwritten in place by
d loss / d logits_s, which is immediately turned into the chunk of dh_s (and accumulated into dW).
So at most one chunk of student and one chunk of teacher logits (plus a few chunk-sized
temporaries on the PyTorch path) exist at a time, never (N, V). The gradients are computed in the
forward pass and stored; backward only rescales them by the upstream gradient.

Paths: the per-chunk softmax / KL / grad-of-logits step is a Triton kernel (one program per row,
online max and sum over blocks of V) on CUDA, or under the CPU interpreter (tests); the chunked
PyTorch path does the same math with torch ops and is the default on CPU.
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _kl_rows_kernel(LS, LT, LOSS, stride_s, stride_t, V, inv_temp, grad_scale,
                    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program = one row. LS: student logits (rows, V), overwritten with d loss / d logits_s
    when WRITE_GRAD; LT: teacher logits or log-probs (rows, V), read only; LOSS: per-row KL (rows,)."""
    row = tl.program_id(0).to(tl.int64)
    ls_ptr = LS + row * stride_s
    lt_ptr = LT + row * stride_t
    offs0 = tl.arange(0, BLOCK_V)

    # pass 1: online max and sum of exp for both rows (finite init so all -inf blocks stay NaN-free)
    m_s = -1e30
    d_s = 0.0
    m_t = -1e30
    d_t = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        ok = offs < V
        zs = tl.load(ls_ptr + offs, mask=ok, other=float("-inf")).to(tl.float32) * inv_temp  # (BLOCK_V,)
        zt = tl.load(lt_ptr + offs, mask=ok, other=float("-inf")).to(tl.float32) * inv_temp
        ms_new = tl.maximum(m_s, tl.max(zs, 0))
        d_s = d_s * tl.exp(m_s - ms_new) + tl.sum(tl.exp(zs - ms_new), 0)
        m_s = ms_new
        mt_new = tl.maximum(m_t, tl.max(zt, 0))
        d_t = d_t * tl.exp(m_t - mt_new) + tl.sum(tl.exp(zt - mt_new), 0)
        m_t = mt_new
    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)

    # pass 2: KL = sum p_t (log p_t - log p_s); grad of logits = (p_s - p_t) * grad_scale
    kl = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        ok = offs < V
        zs = tl.load(ls_ptr + offs, mask=ok, other=0.0).to(tl.float32) * inv_temp
        zt = tl.load(lt_ptr + offs, mask=ok, other=0.0).to(tl.float32) * inv_temp
        logp_s = zs - lse_s
        logp_t = zt - lse_t
        p_t = tl.where(ok, tl.exp(logp_t), 0.0)
        kl += p_t * tl.where(p_t > 0.0, logp_t - logp_s, 0.0)  # p_t = 0 (tail, or teacher -inf) adds 0
        if WRITE_GRAD:
            grad = (tl.exp(logp_s) - p_t) * grad_scale
            tl.store(ls_ptr + offs, grad.to(LS.dtype.element_ty), mask=ok)
    tl.store(LOSS + row, tl.sum(kl, 0))


def kl_rows_triton(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float, grad_scale: float,
                   write_grad: bool) -> torch.Tensor:
    """Per-row KL(softmax(logits_t/tau) || softmax(logits_s/tau)) (rows,) fp32; if write_grad,
    logits_s is overwritten in place by (p_s - p_t) * grad_scale."""
    rows, V = logits_s.shape
    assert logits_s.stride(1) == 1 and logits_t.stride(1) == 1
    loss = torch.empty(rows, device=logits_s.device, dtype=torch.float32)
    if rows == 0:
        return loss
    block_v = min(triton.next_power_of_2(V), 512 if _INTERPRET else 4096)
    _kl_rows_kernel[(rows,)](logits_s, logits_t, loss, logits_s.stride(0), logits_t.stride(0), V,
                             1.0 / temperature, grad_scale, WRITE_GRAD=write_grad, BLOCK_V=block_v,
                             num_warps=1 if _INTERPRET else 8)
    return loss


def kl_rows_torch(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float, grad_scale: float,
                  write_grad: bool, teacher_owned: bool = False):
    """Same math as kl_rows_triton in PyTorch. Returns (loss_rows (rows,) fp32, grad_logits or None).
    Works in place on logits_s (always ours) and on logits_t when teacher_owned."""
    inv_t = 1.0 / temperature
    zs = logits_s.to(torch.float32).mul_(inv_t)  # (rows, V); aliases logits_s when it is fp32
    zt = logits_t.to(torch.float32)
    zt = zt.mul_(inv_t) if (teacher_owned or zt is not logits_t) else zt * inv_t
    zs = zs.sub_(torch.logsumexp(zs, dim=-1, keepdim=True))  # log p_s
    zt = zt.sub_(torch.logsumexp(zt, dim=-1, keepdim=True))  # log p_t
    p_t = zt.exp()
    ratio = zt.sub_(zs).mul_(p_t)  # p_t (log p_t - log p_s)
    if not torch.isfinite(zt).all():  # only when the teacher has -inf entries (p_t = 0 there)
        ratio.masked_fill_(p_t == 0, 0.0)
    loss = ratio.sum(dim=-1)
    del ratio, zt
    grad = None
    if write_grad:
        grad = zs.exp_().sub_(p_t).mul_(grad_scale)  # (p_s - p_t) / (tau N)
        if grad.dtype != logits_s.dtype:
            grad = grad.to(logits_s.dtype)
    return loss, grad


def _linear_kl_forward(h_s, weight, h_t, teacher_logp, temperature, chunk_size, use_triton, need_dh, need_dw):
    N, D = h_s.shape
    V = weight.shape[0]
    loss_rows = torch.empty(N, device=h_s.device, dtype=torch.float32)
    grad_h = torch.empty_like(h_s) if need_dh else None  # (N, D)
    grad_w = torch.zeros(V, D, device=weight.device, dtype=torch.float32) if need_dw else None  # (V, D)
    write_grad = need_dh or need_dw
    grad_scale = 1.0 / (temperature * max(N, 1))
    for s in range(0, N, chunk_size):
        e = min(N, s + chunk_size)
        hs = h_s[s:e]  # (c, D)
        logits_s = hs @ weight.t()  # (c, V)
        if h_t is not None:
            logits_t, owned = h_t[s:e] @ weight.t(), True  # (c, V)
        else:
            logits_t, owned = teacher_logp[s:e], False  # (c, V)
        if use_triton:
            loss_rows[s:e] = kl_rows_triton(logits_s, logits_t.contiguous(), temperature, grad_scale, write_grad)
            grad_logits = logits_s if write_grad else None
        else:
            loss_rows[s:e], grad_logits = kl_rows_torch(logits_s, logits_t, temperature, grad_scale,
                                                        write_grad, teacher_owned=owned)
        del logits_t
        if need_dh:
            grad_h[s:e] = grad_logits @ weight  # (c, D)
        if need_dw:
            if grad_logits.dtype == torch.float32:
                grad_w.addmm_(grad_logits.t(), hs.float())
            else:
                grad_w.add_(grad_logits.t() @ hs)
        del logits_s, grad_logits
    return loss_rows.sum() / max(N, 1), grad_h, grad_w


class LinearKLFunction(torch.autograd.Function):
    """loss = (1/N) sum_n KL(softmax(z_t,n) || softmax(z_s,n)), z_s = h_s W^T / tau,
    z_t = h_t W^T / tau (or teacher_logp / tau).

    d loss/d h_s = ((p_s - p_t) / (tau N)) W and d loss/d W = ((p_s - p_t) / (tau N))^T h_s are
    computed chunk by chunk in forward and stored; backward multiplies them by the upstream grad.
    """

    @staticmethod
    def forward(ctx, h_s, weight, h_t, teacher_logp, temperature, chunk_size, use_triton):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_h, grad_w = _linear_kl_forward(h_s, weight, h_t, teacher_logp, temperature, chunk_size,
                                                  use_triton, need_dh, need_dw)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def fused_linear_kl(h_s: torch.Tensor, weight: torch.Tensor, h_t: torch.Tensor | None = None,
                    teacher_logp: torch.Tensor | None = None, temperature: float = 1.0,
                    chunk_size: int = 1024, use_triton: bool | None = None) -> torch.Tensor:
    """Mean over the N rows of KL(p_teacher || p_student); differentiable w.r.t. h_s and weight.
    use_triton=None: Triton on CUDA, chunked PyTorch on CPU."""
    if (h_t is None) == (teacher_logp is None):
        raise ValueError("give exactly one of h_t (teacher hidden states) and teacher_logp")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if h_s.dim() != 2 or weight.dim() != 2 or h_s.shape[1] != weight.shape[1]:
        raise ValueError(f"expected h_s (N, D) and weight (V, D), got {tuple(h_s.shape)}, {tuple(weight.shape)}")
    if h_t is not None and h_t.shape != h_s.shape:
        raise ValueError(f"h_t {tuple(h_t.shape)} must match h_s {tuple(h_s.shape)}")
    if teacher_logp is not None and teacher_logp.shape != (h_s.shape[0], weight.shape[0]):
        raise ValueError(f"teacher_logp must be (N, V), got {tuple(teacher_logp.shape)}")
    if use_triton is None:
        use_triton = h_s.is_cuda
    if use_triton and not h_s.is_cuda and not _INTERPRET:
        raise RuntimeError("the Triton linear-KL path needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    h_t = h_t.detach() if h_t is not None else None
    teacher_logp = teacher_logp.detach() if teacher_logp is not None else None
    if not torch.is_grad_enabled():  # evaluation: value only, no gradient buffers
        return _linear_kl_forward(h_s, weight, h_t, teacher_logp, float(temperature), int(chunk_size),
                                  bool(use_triton), False, False)[0]
    return LinearKLFunction.apply(h_s, weight, h_t, teacher_logp, float(temperature), int(chunk_size),
                                  bool(use_triton))


def linear_kl_reference(h_s: torch.Tensor, W: torch.Tensor, h_t: torch.Tensor | None = None,
                        teacher_logp: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Unfused: full (N, V) logits, log_softmax, F.kl_div(batchmean) = mean over rows of KL(p_t || p_s)."""
    logp_s = F.log_softmax((h_s @ W.t()).float() / temperature, dim=-1)  # (N, V)
    with torch.no_grad():
        z_t = (h_t @ W.t()) if h_t is not None else teacher_logp
        logp_t = F.log_softmax(z_t.float() / temperature, dim=-1)  # (N, V)
    return F.kl_div(logp_s, logp_t, log_target=True, reduction="batchmean")
