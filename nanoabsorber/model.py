"""The whole Llama in one file: config, RMSNorm, RoPE (Hugging Face half-split), grouped-query
attention with a KV cache, SwiGLU MLP, and a forward that can return every hidden state.

Numerics follow Hugging Face's LlamaForCausalLM: RMSNorm in fp32 then cast back before the
weight, RoPE tables computed in fp32 (with optional "llama3" frequency scaling), attention
scaled by 1/sqrt(head_dim), tied or untied output embeddings.

Hidden states (for the synchronization losses): h[0] = embedding output, h[l] = residual stream
after block l (before the final norm), l = 1..n_layers.
"""
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .attention import attention


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096               # hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None -> n_heads (plain multi-head attention)
    head_dim: Optional[int] = None    # None -> dim // n_heads
    hidden_dim: int = 11008       # intermediate_size of the SwiGLU MLP
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_seq_len: int = 4096       # max_position_embeddings
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    group_size: int = field(init=False)  # derived: query heads per KV head

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        self.group_size = self.n_heads // self.n_kv_heads
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise ValueError(f"rope_scaling type {kind!r} is not supported (only llama3)")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        known = {f.name for f in fields(cls) if f.init}
        unknown = set(d) - known - {"group_size"}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """Map a Hugging Face config.json (LlamaForCausalLM) to ours."""
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        mt = hf.get("model_type", "llama")
        if mt not in ("llama", "mistral") and not any("Llama" in a or "Mistral" in a for a in archs):
            raise ValueError(f"model_type {mt!r} is not a Llama")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        if hf.get("sliding_window") and hf.get("use_sliding_window", mt == "mistral"):
            pass  # windows longer than our contexts behave as full attention; documented in README
        eos = hf.get("eos_token_id")
        # transformers >= 5 writes "rope_parameters" (theta + scaling); older files use two keys
        rp = dict(hf.get("rope_parameters") or {})
        theta = hf.get("rope_theta", rp.pop("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
        return cls(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"), hidden_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling, max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
            bos_id=hf.get("bos_token_id"), eos_id=eos[0] if isinstance(eos, list) else eos,
        )

    def to_hf(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "intermediate_size": self.hidden_dim, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "torch_dtype": "float32",
        }


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), fp32, with llama3 scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    rs = cfg.rope_scaling
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_len = rs.get("original_max_position_embeddings", 8192)
        lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def kv_cache_bytes(cfg: "LlamaConfig", n_tokens: int, element_size: int) -> int:
    """Bytes of keys + values for n_tokens over every layer (the one KV-size formula)."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * n_tokens * element_size


class KVCache:
    """Preallocated keys/values for every layer: (n_layers, B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached
        self.max_len = max_len

    def update(self, layer: int, k, v):
        """Write k, v (B, Hkv, T, D) at the current position; return the cached prefix incl. them."""
        T = k.shape[2]
        end = self.pos + T
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, H * D, bias=cfg.attention_bias)
        self.wk = nn.Linear(cfg.dim, Hkv * D, bias=cfg.attention_bias)
        self.wv = nn.Linear(cfg.dim, Hkv * D, bias=cfg.attention_bias)
        self.wo = nn.Linear(H * D, cfg.dim, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, layer: int, cache: Optional[KVCache]):
        B, T, _ = x.shape
        c = self.cfg
        q = self.wq(x).view(B, T, c.n_heads, c.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.wk(x).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer, k, v)                                  # (B, Hkv, S, D)
        y = attention(q, k, v, causal=True)                                   # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, c.n_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layer, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, layer, cache)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.embed.weight
        self.inv_freq = rope_inv_freq(cfg)  # plain fp32 CPU tensor, not a parameter or buffer
        self.grad_checkpointing = False     # True: recompute each block in backward (training passes only)
        self._rope_cache = {}

    def tie_weights(self):
        """Re-tie the output head to the embedding (needed after load_state_dict(assign=True))."""
        if self.cfg.tie_embeddings:
            self.output.weight = self.embed.weight

    def init_weights(self, std: float = 0.02):
        """Random init for training from scratch (GPT-2 style, residual projections scaled)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("wo.weight", "down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def rope(self, start: int, T: int, device, dtype):
        """cos, sin of shape (T, head_dim) for positions start..start+T-1 (fp32 math, cast to dtype)."""
        key = (device, dtype)
        tab = self._rope_cache.get(key)
        if tab is None or tab[0].shape[0] < start + T:
            n = max(start + T, 2 * (tab[0].shape[0] if tab else 0), 256)
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor even if built under inference_mode
                pos = torch.arange(n, dtype=torch.float32)
                freqs = torch.outer(pos, self.inv_freq)                   # (n, D/2)
                emb = torch.cat((freqs, freqs), dim=-1)                   # (n, D)
                tab = (emb.cos().to(device, dtype), emb.sin().to(device, dtype))
            self._rope_cache[key] = tab
        return tab[0][start:start + T], tab[1][start:start + T]

    def new_cache(self, batch: int = 1, max_len: Optional[int] = None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.cfg, batch, max_len or self.cfg.max_seq_len, p.device, p.dtype)

    def forward(self, idx, cache: Optional[KVCache] = None, hidden: bool = False,
                logits: bool = True, start_pos: int = 0):
        """idx (B, T) token ids. Returns logits (B, T, V); with hidden=True returns
        (logits or None, [h0, h1, ..., hL]) where each h is (B, T, dim).
        Positions start at cache.pos when a cache is given, else at start_pos."""
        B, T = idx.shape
        start = cache.pos if cache is not None else start_pos
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache overflow: {start} + {T} tokens > max_len {cache.max_len}")
        x = self.embed(idx)                                               # (B, T, dim)
        cos, sin = self.rope(start, T, x.device, x.dtype)                 # (T, head_dim)
        hs = [x] if hidden else None
        ckpt = getattr(self, "grad_checkpointing", False) and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            if ckpt:  # activation checkpointing: keep the block's input only, recompute it in backward
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, i, None, use_reentrant=False)
            else:
                x = block(x, cos, sin, i, cache)
            if hidden:
                hs.append(x)
        if cache is not None:
            cache.pos += T
        out = self.output(self.norm(x)) if logits else None               # (B, T, V)
        return (out, hs) if hidden else out

    def num_params(self) -> int:
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n


__all__ = ["LlamaConfig", "Llama", "KVCache", "RMSNorm", "rope_inv_freq", "rotate_half", "asdict"]
