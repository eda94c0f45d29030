"""Tensor names: Hugging Face <-> ours, and GGUF (llama.cpp) -> Hugging Face, as small explicit
maps ("{i}" is the layer index, "{p}" weight or bias)."""

# Hugging Face name -> our name ("{i}" is the layer index).
NAME_MAP = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.self_attn.q_proj.{p}": "layers.{i}.attn.wq.{p}",
    "model.layers.{i}.self_attn.k_proj.{p}": "layers.{i}.attn.wk.{p}",
    "model.layers.{i}.self_attn.v_proj.{p}": "layers.{i}.attn.wv.{p}",
    "model.layers.{i}.self_attn.o_proj.{p}": "layers.{i}.attn.wo.{p}",
    "model.layers.{i}.mlp.gate_proj.{p}": "layers.{i}.mlp.gate.{p}",
    "model.layers.{i}.mlp.up_proj.{p}": "layers.{i}.mlp.up.{p}",
    "model.layers.{i}.mlp.down_proj.{p}": "layers.{i}.mlp.down.{p}",
}

# GGUF (llama.cpp) name -> Hugging Face name.
GGUF_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.{p}": "model.layers.{i}.self_attn.q_proj.{p}",
    "blk.{i}.attn_k.{p}": "model.layers.{i}.self_attn.k_proj.{p}",
    "blk.{i}.attn_v.{p}": "model.layers.{i}.self_attn.v_proj.{p}",
    "blk.{i}.attn_output.{p}": "model.layers.{i}.self_attn.o_proj.{p}",
    "blk.{i}.ffn_gate.{p}": "model.layers.{i}.mlp.gate_proj.{p}",
    "blk.{i}.ffn_up.{p}": "model.layers.{i}.mlp.up_proj.{p}",
    "blk.{i}.ffn_down.{p}": "model.layers.{i}.mlp.down_proj.{p}",
}


def rename(name: str, table: dict) -> str | None:
    """Map one tensor name through a table with {i} (layer) and {p} (weight/bias) holes."""
    if name in table:
        return table[name]
    parts = name.split(".")
    for i, tok in enumerate(parts):
        if tok.isdigit():
            generic = ".".join(parts[:i] + ["{i}"] + parts[i + 1:])
            for p in ("weight", "bias"):
                key = generic[: -len(p)] + "{p}" if generic.endswith(p) else None
                if key in table:
                    return table[key].format(i=tok, p=p)
            if generic in table:
                return table[generic].format(i=tok)
            break
    return None


def hf_to_ours(name: str) -> str | None:
    return rename(name, NAME_MAP)


def ours_to_hf(name: str) -> str:
    inv = {v: k for k, v in NAME_MAP.items()}
    out = rename(name, inv)
    if out is None:
        raise KeyError(name)
    return out
