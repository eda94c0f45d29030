"""FlashAttention-2 style attention in Triton: forward, backward, causal, GQA, KV-cache queries.

Layout: q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D) with Hq = g * Hkv (grouped-query attention).
Query head h reads K/V head h // g; K/V are never repeated in memory, and dK/dV of a K/V head is
the sum over the g query heads of its group (the dK/dV kernel loops over the group).

When Tq < Tk the queries are the LAST Tq positions of the key sequence (decoding with a KV cache),
so with causal=True query i sits at key position i + (Tk - Tq): bottom-right aligned mask.
causal=True with Tq > Tk would leave rows with no visible key and is refused (ValueError).

Math (one query row i, s = sm_scale, keys j visible to i):
    z_ij  = s * q_i . k_j
    P_ij  = exp(z_ij - LSE_i),       LSE_i = log sum_j exp(z_ij)
    O_i   = sum_j P_ij v_j
Backward, with dO given and Delta_i = dO_i . O_i:
    dV_j  = sum_i P_ij dO_i
    dP_ij = dO_i . v_j
    dS_ij = P_ij (dP_ij - Delta_i)
    dQ_i  = s * sum_j dS_ij k_j,     dK_j = s * sum_i dS_ij q_i

The kernels work in base 2: z is scaled by log2(e) once so that exp becomes exp2, the online
softmax (running max m, running sum l) runs in fp32, and LSE is saved in base 2 for the backward.
Any sequence length works (masked tails); any head dim up to 256 works (D is padded to a power of
two >= 16 with masked loads), tested for 16 and 64 in the interpreter and 64/128 on GPU.

Dtypes: fp16/bf16 (or fp32, with exact "ieee" dots) on CUDA. Under the CPU interpreter
(TRITON_INTERPRET=1) bf16 arithmetic is unreliable, so fp16/bf16 inputs are upcast to fp32 there.
"""
import math
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# NANOABSORBER_FA_AUTOTUNE=0: one config per kernel (a member of each sweep below) instead of the
# sweep, so a time-boxed GPU check compiles 3 kernels per shape class, not 68
_ONE_CONFIG = os.environ.get("NANOABSORBER_FA_AUTOTUNE", "1") == "0"
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# autotune configs: Hopper-friendly sweep on CUDA, one small config under the interpreter
# ----------------------------------------------------------------------------------------------
def _fwd_configs():
    if _INTERPRET:  # BLOCK_M != BLOCK_N on purpose so tests cover the unequal-block causal logic
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    if _ONE_CONFIG:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3, 4)
    ]


def _dq_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    if _ONE_CONFIG:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (32, 64)
        for w in (4, 8)
        for s in (2, 3)
    ]


def _dkdv_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    if _ONE_CONFIG:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (32, 64)
        for bn in (64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]


# Configs that do not fit (shared memory, registers) are skipped by the autotuner itself: it catches
# OutOfResources. All configs above were AOT-compiled for sm_90 (bf16/fp16, D 64/128) without errors.


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
               lo, hi, Tk, causal_offset, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over key blocks [lo, hi). MASKED=False is the fast path for blocks that are
    entirely in range and entirely visible to every row of the query block."""
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d[None, :] < HEAD_DIM  # (1, D_PAD), all-true when D is a power of two
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0  # (BLOCK_N,)
        kv_ok = d_ok
        if MASKED:
            kv_ok = (offs_n[:, None] < Tk) & d_ok
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            keep = offs_n[None, :] < Tk
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            qk = tl.where(keep, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))  # (BLOCK_M,)
        p = tl.math.exp2(qk - m_ij[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)  # (BLOCK_M, D_PAD)
        m_i = m_ij
    return acc, l_i, m_i


@triton.autotune(configs=_fwd_configs(), key=["TQ_BUCKET", "TK_BUCKET", "HEAD_DIM", "CAUSAL", "DOT_PREC"])
@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qh, stride_qm,
              stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn,
              stride_ob, stride_oh, stride_om,
              HQ, GROUP, Tq, Tk, causal_offset, qk_scale,
              TQ_BUCKET, TK_BUCKET,  # autotune keys only (next power of two of Tq / Tk)
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)  # b * HQ + h
    off_b = off_bh // HQ
    off_h = off_bh % HQ
    off_hk = off_h // GROUP  # the K/V head this query head reads
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    o_base = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, D_PAD)  # (D_PAD,)
    q_ok = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_ok, other=0.0)  # (BLOCK_M, D_PAD)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    # keys [0, n_full) are in range and visible to every row of this block: no masks needed.
    # keys [n_full, hi) need the tail mask and/or the causal diagonal.
    if CAUSAL:
        hi = tl.minimum(Tk, (start_m + 1) * BLOCK_M + causal_offset)
        n_full = (tl.minimum(start_m * BLOCK_M + causal_offset + 1, Tk) // BLOCK_N) * BLOCK_N
    else:
        hi = Tk
        n_full = (Tk // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                               0, n_full, Tk, causal_offset, qk_scale,
                               BLOCK_N, HEAD_DIM, D_PAD, False, CAUSAL, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                               n_full, hi, Tk, causal_offset, qk_scale,
                               BLOCK_N, HEAD_DIM, D_PAD, True, CAUSAL, DOT_PREC)
    # every row (padded ones too) sees key 0, so l_i > 0
    acc = acc / l_i[:, None]
    lse = m_i + tl.math.log2(l_i)  # base-2 log-sum-exp of the scaled scores
    tl.store(LSE + off_bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], acc.to(O.dtype.element_ty), mask=q_ok)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm,
                         HQ, Tq, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta_i = sum_d O_id * dO_id  (fp32), shape (B*Hq, Tq)."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // HQ
    off_h = off_bh % HQ
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    ok = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b.to(tl.int64) * stride_db + off_h.to(tl.int64) * stride_dh
                 + offs_m[:, None] * stride_dm + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + off_bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.autotune(configs=_dkdv_configs(), key=["TQ_BUCKET", "TK_BUCKET", "HEAD_DIM", "CAUSAL", "DOT_PREC"])
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   stride_qb, stride_qh, stride_qm,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_dom,
                   stride_dkb, stride_dkh, stride_dkn,
                   stride_dvb, stride_dvh, stride_dvn,
                   HQ, HKV, GROUP, Tq, Tk, causal_offset, qk_scale, sm_scale,
                   TQ_BUCKET, TK_BUCKET,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program = one block of BLOCK_N keys of one K/V head; loops over the GROUP query heads
    that share this K/V head and over their query blocks, so dK/dV are summed over the group."""
    start_n = tl.program_id(0) * BLOCK_N
    off_bhk = tl.program_id(1)  # b * HKV + hk
    off_b = off_bhk // HKV
    off_hk = off_bhk % HKV

    offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_d = tl.arange(0, D_PAD)
    offs_m0 = tl.arange(0, BLOCK_M)
    kv_ok = (offs_n[:, None] < Tk) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)  # (BLOCK_N, D_PAD)
    v = tl.load(V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)  # (BLOCK_N, D_PAD)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)

    # causal: query row i sees key j iff j <= i + causal_offset, so start at i = start_n - offset
    if CAUSAL:
        lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
    else:
        lo = 0
    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        do_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
        row_base = (off_b * HQ + off_h).to(tl.int64) * Tq  # into LSE / DELTA, (B*Hq, Tq)
        for start_m in range(lo, Tq, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            offs_m = start_m + offs_m0  # (BLOCK_M,)
            q_ok = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_ok, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_ok, other=0.0)
            lse = tl.load(LSE + row_base + offs_m, mask=offs_m < Tq, other=0.0)  # (BLOCK_M,)
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < Tq, other=0.0)
            qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
            keep = offs_m[None, :] < Tq
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= offs_m[None, :] + causal_offset)
            pT = tl.where(keep, tl.math.exp2(qkT - lse[None, :]), 0.0)  # P^T
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)  # (BLOCK_N, D_PAD)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)  # (BLOCK_N, D_PAD)
    dk = dk * sm_scale
    tl.store(DK + off_b.to(tl.int64) * stride_dkb + off_hk.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + off_b.to(tl.int64) * stride_dvb + off_hk.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.autotune(configs=_dq_configs(), key=["TQ_BUCKET", "TK_BUCKET", "HEAD_DIM", "CAUSAL", "DOT_PREC"])
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 stride_qb, stride_qh, stride_qm,
                 stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn,
                 stride_dob, stride_doh, stride_dom,
                 stride_dqb, stride_dqh, stride_dqm,
                 HQ, GROUP, Tq, Tk, causal_offset, qk_scale, sm_scale,
                 TQ_BUCKET, TK_BUCKET,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program = one block of BLOCK_M query rows of one query head; loops over key blocks."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // HQ
    off_h = off_bh % HQ
    off_hk = off_h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_n0 = tl.arange(0, BLOCK_N)
    q_ok = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_ok, other=0.0)  # (BLOCK_M, D_PAD)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_ok, other=0.0)
    lse = tl.load(LSE + off_bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)  # (BLOCK_M,)
    delta = tl.load(DELTA + off_bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum(Tk, (start_m + 1) * BLOCK_M + causal_offset)
    else:
        hi = Tk
    for start_n in range(0, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        kv_ok = (offs_n[:, None] < Tk) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
        keep = offs_n[None, :] < Tk
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
        p = tl.where(keep, tl.math.exp2(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)  # (BLOCK_M, D_PAD)
    dq = dq * sm_scale
    tl.store(DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_ok)


# ----------------------------------------------------------------------------------------------
# host wrappers
# ----------------------------------------------------------------------------------------------
def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _common(q, k, causal):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    D_PAD = max(16, triton.next_power_of_2(D))
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"  # "tf32" is ignored for fp16/bf16 dots
    offset = Tk - Tq if causal else 0
    return B, Hq, Hkv, Tq, Tk, D, D_PAD, dot_prec, offset


def _flash_fwd(q, k, v, causal, sm_scale):
    B, Hq, Hkv, Tq, Tk, D, D_PAD, dot_prec, offset = _common(q, k, causal)
    o = torch.empty_like(q)  # (B, Hq, Tq, D)
    lse = torch.empty((B, Hq, Tq), device=q.device, dtype=torch.float32)  # base-2 LSE
    grid = lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * Hq)  # noqa: E731
    _attn_fwd[grid](
        q, k, v, o, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        Hq, Hq // Hkv, Tq, Tk, offset, sm_scale * LOG2E,
        _bucket(Tq), _bucket(Tk),
        HEAD_DIM=D, D_PAD=D_PAD, CAUSAL=causal, DOT_PREC=dot_prec,
    )
    return o, lse


def _flash_bwd(do, q, k, v, o, lse, causal, sm_scale):
    B, Hq, Hkv, Tq, Tk, D, D_PAD, dot_prec, offset = _common(q, k, causal)
    do = _last_dim_contiguous(do)
    delta = torch.empty((B, Hq, Tq), device=q.device, dtype=torch.float32)
    PRE_M = 64 if not _INTERPRET else 32
    _attn_bwd_preprocess[(triton.cdiv(Tq, PRE_M), B * Hq)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        Hq, Tq, HEAD_DIM=D, D_PAD=D_PAD, BLOCK_M=PRE_M,
    )
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    qk_scale = sm_scale * LOG2E
    grid_kv = lambda META: (triton.cdiv(Tk, META["BLOCK_N"]), B * Hkv)  # noqa: E731
    _attn_bwd_dkdv[grid_kv](
        q, k, v, do, lse, delta, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        Hq, Hkv, Hq // Hkv, Tq, Tk, offset, qk_scale, sm_scale,
        _bucket(Tq), _bucket(Tk),
        HEAD_DIM=D, D_PAD=D_PAD, CAUSAL=causal, DOT_PREC=dot_prec,
    )
    grid_q = lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * Hq)  # noqa: E731
    _attn_bwd_dq[grid_q](
        q, k, v, do, lse, delta, dq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        Hq, Hq // Hkv, Tq, Tk, offset, qk_scale, sm_scale,
        _bucket(Tq), _bucket(Tk),
        HEAD_DIM=D, D_PAD=D_PAD, CAUSAL=causal, DOT_PREC=dot_prec,
    )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """O = softmax(s * Q K^T + mask) V per (batch, query head), K/V head = query head // g.

    Forward saves O and the base-2 log-sum-exp LSE2_i = log2 sum_j 2^(s log2(e) q_i.k_j) (B, Hq, Tq).
    Backward recomputes P = 2^(s log2(e) Q K^T - LSE2) blockwise (never materialised in full):
        Delta = rowsum(dO * O), dV = P^T dO, dS = P * (dO V^T - Delta), dQ = s dS K, dK = s dS^T Q,
    with dK and dV summed over the g query heads that share a K/V head.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        o, lse = _flash_fwd(q, k, v, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    sm_scale: float | None = None) -> torch.Tensor:
    """Differentiable FlashAttention-2. q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D), Hq % Hkv == 0.

    causal with Tq < Tk: queries are the last Tq positions (bottom-right aligned mask).
    Returns (B, Hq, Tq, D) in q's dtype.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("expected q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D)")
    B, Hq, Tq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"query heads {Hq} must be a multiple of key/value heads {k.shape[1]}")
    if causal and Tq > k.shape[2]:
        raise ValueError(f"causal attention with more queries ({Tq}) than keys ({k.shape[2]}) "
                         "leaves rows with no visible key")
    if D > 256:
        raise ValueError(f"head dim {D} > 256 is not supported")
    if not q.is_cuda and not _INTERPRET:
        raise RuntimeError("flash_attention needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    if _INTERPRET and q.dtype != torch.float32:  # interpreter bf16/fp16 arithmetic is unreliable
        out = FlashAttentionFunction.apply(q.float(), k.float(), v.float(), bool(causal), float(sm_scale))
        return out.to(q.dtype)
    return FlashAttentionFunction.apply(q, k, v, bool(causal), float(sm_scale))


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        sm_scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch: repeat K/V heads, explicit Q K^T, bottom-right causal mask, softmax, @ V.
    Computes in fp32 and returns q's dtype."""
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    g = Hq // k.shape[1]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    k = k.float().repeat_interleave(g, dim=1)  # (B, Hq, Tk, D)
    v = v.float().repeat_interleave(g, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * sm_scale  # (B, Hq, Tq, Tk)
    if causal:
        qpos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
        kpos = torch.arange(Tk, device=q.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(q.dtype)
