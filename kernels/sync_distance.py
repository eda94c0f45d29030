"""Hidden-state synchronisation distance over all layers in one pass, with its student gradient.

Student S and teacher T are stacked hidden states (L, N, D): L layers (embedding output included),
N positions, D hidden size. The teacher carries no gradient. Optional per-position weights w (N,)
are normalised to mean 1 (w_p <- N w_p / sum(w)), so uniform weights are exactly the plain mean.

    "l1":      (1 / (L N D)) sum_{l,p,d} w_p |S - T|
               (= (1/N) sum_p sum_l ||S_lp - T_lp||_1 / (L D): the L1 sync loss with a constant
               normaliser, so its scale does not depend on the model size)
    "mse":     (1 / (L N D)) sum_{l,p,d} w_p (S - T)^2
    "l1_norm": (1 / L) sum_l [ sum_{p,d} w_p |S - T| / (sum_{p,d} w_p |T| + 1e-6) ]
               (L1 relative to the teacher's magnitude per layer, Deep-Context-Distillation style)

Gradient w.r.t. S: g_lpd * c_l with g = w_p sign(S - T) (sign(0) = 0) for the L1 kinds and
g = 2 w_p (S - T) for "mse"; c_l = 1/(L N D) for "l1"/"mse", 1/(L (sum w|T_l| + 1e-6)) for "l1_norm".

The Triton kernel reads S and T once: it writes g (unscaled) and per-program partial sums of the
distance (and of w|T| for "l1_norm"); the host sums the partials (deterministic, no atomics).
Backward multiplies g by (upstream grad * c_l), the one elementwise pass a rescale needs anyway.
"""
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
KINDS = {"l1": 0, "mse": 1, "l1_norm": 2}
EPS = 1e-6


@triton.jit
def _sync_kernel(S, T, W, G, PART, PART_T, ND, D, n_blocks,
                 KIND: tl.constexpr, HAS_W: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (n_blocks, L): program (i, l) handles elements [i*BLOCK, (i+1)*BLOCK) of layer l's
    flattened (N*D,) slab."""
    pid = tl.program_id(0)
    layer = tl.program_id(1)
    base = layer.to(tl.int64) * ND
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    ok = offs < ND
    s = tl.load(S + base + offs, mask=ok, other=0.0).to(tl.float32)
    t = tl.load(T + base + offs, mask=ok, other=0.0).to(tl.float32)
    diff = s - t
    if KIND == 1:  # mse
        val = diff * diff
        g = 2.0 * diff
    else:  # l1, l1_norm
        val = tl.abs(diff)
        g = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    mag = tl.abs(t)
    if HAS_W:
        w = tl.load(W + offs // D, mask=ok, other=0.0).to(tl.float32)  # position weight
        val = val * w
        g = g * w
        mag = mag * w
    tl.store(PART + layer * n_blocks + pid, tl.sum(val, 0))
    if KIND == 2:
        tl.store(PART_T + layer * n_blocks + pid, tl.sum(mag, 0))
    if WRITE_GRAD:
        tl.store(G + base + offs, g.to(G.dtype.element_ty), mask=ok)


def _normalised_weights(weights, N, device):
    if weights is None:
        return None
    w = weights.detach().to(device=device, dtype=torch.float32).reshape(-1)
    if w.numel() != N:
        raise ValueError(f"weights must have N={N} entries, got {w.numel()}")
    return w * (N / w.sum())


def sync_distance_triton(S: torch.Tensor, T: torch.Tensor, kind: str, weights=None, write_grad=True):
    """Returns (value fp32 scalar, g (L, N, D) in S.dtype or None, c (L,) fp32 per-layer grad scale)."""
    L, N, D = S.shape
    S = S.contiguous()
    T = T.contiguous()
    w = _normalised_weights(weights, N, S.device)
    ND = N * D
    BLOCK = 1024 if _INTERPRET else 4096
    n_blocks = triton.cdiv(ND, BLOCK)
    part = torch.empty((L, n_blocks), device=S.device, dtype=torch.float32)
    part_t = torch.empty((L, n_blocks), device=S.device, dtype=torch.float32) if kind == "l1_norm" else part
    g = torch.empty_like(S) if write_grad else S  # dummy pointer when not written
    _sync_kernel[(n_blocks, L)](S, T, w if w is not None else S, g, part, part_t, ND, D, n_blocks,
                                KIND=KINDS[kind], HAS_W=w is not None, WRITE_GRAD=write_grad, BLOCK=BLOCK,
                                num_warps=1 if _INTERPRET else 8)
    if kind == "l1_norm":
        den = part_t.sum(1) + EPS  # (L,)
        value = (part.sum(1) / den).mean()
        c = 1.0 / (L * den)
    else:
        value = part.sum() / (L * ND)
        c = torch.full((L,), 1.0 / (L * ND), device=S.device, dtype=torch.float32)
    return value, (g if write_grad else None), c


class SyncDistanceFunction(torch.autograd.Function):
    """Sync distance (see module docstring); dS = g * c_l computed in forward, rescaled in backward."""

    @staticmethod
    def forward(ctx, S, T, weights, kind):
        value, g, c = sync_distance_triton(S, T, kind, weights, write_grad=ctx.needs_input_grad[0])
        ctx.save_for_backward(g, c)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        g, c = ctx.saved_tensors
        scale = (c * grad_out).view(-1, 1, 1)  # (L, 1, 1) fp32
        return (g * scale).to(g.dtype), None, None, None


def sync_distance(S: torch.Tensor, T: torch.Tensor, kind: str = "l1", weights: torch.Tensor | None = None):
    """Differentiable (w.r.t. S) sync distance with the Triton kernel. S, T (L, N, D)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if S.shape != T.shape or S.dim() != 3:
        raise ValueError(f"expected S and T of the same shape (L, N, D), got {tuple(S.shape)}, {tuple(T.shape)}")
    if not S.is_cuda and not _INTERPRET:
        raise RuntimeError("sync_distance (Triton) needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    if not torch.is_grad_enabled():  # evaluation: value only, no gradient buffer
        return sync_distance_triton(S, T.detach(), kind, weights, write_grad=False)[0]
    return SyncDistanceFunction.apply(S, T.detach(), weights, kind)


def sync_distance_reference(S: torch.Tensor, T: torch.Tensor, kind: str = "l1",
                            weights: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch (autograd) version of the same distances, computed in fp32."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    L, N, D = S.shape
    diff = S.float() - T.detach().float()  # (L, N, D)
    w = _normalised_weights(weights, N, S.device)
    w = torch.ones(N, device=S.device) if w is None else w
    w = w.view(1, N, 1)
    if kind == "l1":
        return (diff.abs() * w).mean()
    if kind == "mse":
        return (diff.square() * w).mean()
    num = (diff.abs() * w).sum(dim=(1, 2))  # (L,)
    den = (T.detach().float().abs() * w).sum(dim=(1, 2)) + EPS
    return (num / den).mean()
