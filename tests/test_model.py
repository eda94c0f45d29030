"""Model invariants on tiny random Llamas: KV-cache decoding equals a full forward, causality,
RoPE + GQA against a naive per-head reference written independently here, llama3 RoPE scaling,
hidden-state layout."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoabsorber.model import Llama, LlamaConfig, rope_inv_freq
from tests.conftest import tiny


def naive_forward(m: Llama, idx):
    """A deliberately plain Llama: per-head loops, explicit masks, HF half-split RoPE."""
    c = m.cfg
    x = m.embed.weight[idx]                                    # (B, T, dim)
    B, T, _ = x.shape
    d = c.head_dim
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2).float() / d)) if c.rope_scaling is None else rope_inv_freq(c)
    ang = torch.arange(T).float()[:, None] * inv[None, :]      # (T, d/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rms(v, w):
        return w * (v / torch.sqrt((v * v).mean(-1, keepdim=True) + c.norm_eps))

    def rot(v):  # v (T, d)
        return v * cos + torch.cat([-v[:, d // 2:], v[:, :d // 2]], -1) * sin

    for blk in m.layers:
        a = blk.attn
        h = rms(x, blk.attn_norm.weight)
        out = torch.zeros(B, T, c.n_heads * d)
        for b in range(B):
            q = h[b] @ a.wq.weight.T
            k = h[b] @ a.wk.weight.T
            v = h[b] @ a.wv.weight.T
            for head in range(c.n_heads):
                kvh = head // (c.n_heads // c.n_kv_heads)
                qh = rot(q[:, head * d:(head + 1) * d])
                kh = rot(k[:, kvh * d:(kvh + 1) * d])
                vh = v[:, kvh * d:(kvh + 1) * d]
                s = qh @ kh.T / math.sqrt(d)
                s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
                out[b, :, head * d:(head + 1) * d] = s.softmax(-1) @ vh
        x = x + out @ a.wo.weight.T
        h = rms(x, blk.mlp_norm.weight)
        mlp = blk.mlp
        x = x + (F.silu(h @ mlp.gate.weight.T) * (h @ mlp.up.weight.T)) @ mlp.down.weight.T
    return rms(x, m.norm.weight) @ m.output.weight.T


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("tie", [False, True])
def test_matches_naive_reference(n_heads, n_kv, tie):
    m = tiny(n_heads=n_heads, n_kv_heads=n_kv, dim=48, tie=tie)
    idx = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(m(idx), naive_forward(m, idx), atol=1e-4, rtol=1e-4)


def test_explicit_head_dim_and_llama3_scaling():
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
    m = tiny(n_heads=4, n_kv_heads=2, dim=32, head_dim=16, rope_scaling=rs)
    assert m.layers[0].attn.wq.weight.shape == (64, 32)
    idx = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(m(idx), naive_forward(m, idx), atol=1e-4, rtol=1e-4)


def test_llama3_inv_freq_bands():
    """High frequencies untouched, low frequencies divided by factor, the band between smooth."""
    base = LlamaConfig(dim=128, n_heads=1, head_dim=128, rope_theta=500000.0)
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    scaled = LlamaConfig(dim=128, n_heads=1, head_dim=128, rope_theta=500000.0, rope_scaling=rs)
    a, b = rope_inv_freq(base), rope_inv_freq(scaled)
    wavelen = 2 * math.pi / a
    hi = wavelen < 8192 / 4
    lo = wavelen > 8192 / 1
    assert torch.equal(a[hi], b[hi])
    torch.testing.assert_close(b[lo], a[lo] / 8)
    mid = ~hi & ~lo
    assert mid.any() and torch.all(b[mid] < a[mid]) and torch.all(b[mid] > a[mid] / 8)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(2, 40), split=st.data(), seed=st.integers(0, 2**16))
def test_kv_cache_decoding_equals_full_forward(T, split, seed):
    m = tiny(seed=seed % 7)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 97, (2, T), generator=g)
    cut = split.draw(st.integers(1, T - 1))
    with torch.no_grad():
        full = m(idx)
        cache = m.new_cache(2, 64)
        parts = [m(idx[:, :cut], cache=cache)]
        for t in range(cut, T):  # then one token at a time
            parts.append(m(idx[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == T


@settings(max_examples=15, deadline=None)
@given(T=st.integers(2, 30), data=st.data())
def test_causality(T, data):
    m = tiny()
    t = data.draw(st.integers(0, T - 1))
    idx = torch.randint(0, 97, (1, T))
    idx2 = idx.clone()
    idx2[0, t] = (idx[0, t] + 1 + data.draw(st.integers(0, 95))) % 97
    with torch.no_grad():
        a, b = m(idx), m(idx2)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=0, rtol=0)
    assert not torch.allclose(a[:, t], b[:, t])


def test_hidden_states_layout():
    m = tiny(layers=3)
    idx = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        logits, hs = m(idx, hidden=True)
        none, hs2 = m(idx, hidden=True, logits=False)
    assert none is None and len(hs) == 4
    torch.testing.assert_close(hs[0], m.embed(idx))
    torch.testing.assert_close(m.output(m.norm(hs[-1])), logits)
    for a, b in zip(hs, hs2):
        torch.testing.assert_close(a, b)
    # h[l] is the residual stream after block l
    with torch.no_grad():
        cos, sin = m.rope(0, 7, idx.device, torch.float32)
        torch.testing.assert_close(m.layers[1](hs[1], cos, sin, 1, None), hs[2])


def test_start_pos_equals_cache_offset():
    """A forward at start_pos=p gives the positions a cache at p would (RoPE is relative, so
    logits of a fresh sequence do not depend on the absolute offset)."""
    m = tiny()
    idx = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(m(idx, start_pos=50), m(idx), atol=1e-4, rtol=1e-4)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple"):
        LlamaConfig(dim=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig(dim=32, n_heads=4, rope_scaling={"rope_type": "yarn", "factor": 2})
    c = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2)
    assert c.head_dim == 16 and c.group_size == 2
    assert LlamaConfig.from_dict(c.to_dict()) == c
    assert LlamaConfig.from_hf(c.to_hf()) == c
