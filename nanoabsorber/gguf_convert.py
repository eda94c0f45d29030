"""Read a llama-architecture GGUF file (llama.cpp's format) into a float state dict with Hugging
Face tensor names, plus our config; and convert it once into a Hugging Face-layout directory.

llama.cpp's converter permutes the rows of the Q and K projections (to interleaved RoPE pairs);
`unpermute` undoes that so the weights work with the half-split RoPE of Hugging Face and ours.
"""
import json
import time
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError
from .io import atomic_dir, atomic_save_safetensors, atomic_write_text
from .model import LlamaConfig
from .names import GGUF_MAP, rename


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf.py's permute() for Q/K weights (out, in)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_gguf(path) -> tuple[LlamaConfig, dict, object]:
    """Returns (config, {hf_name: float32 tensor}, reader)."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    except Exception as e:  # gguf raises ValueError/struct errors on corrupt files
        raise CheckpointError(path, f"not a readable GGUF file ({str(e).splitlines()[0][:120]})") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(path, f"GGUF architecture {arch!r} is not llama")
    a = "llama."
    n_heads = int(_field(reader, a + "attention.head_count"))
    n_kv = int(_field(reader, a + "attention.head_count_kv", n_heads))
    names = {t.name for t in reader.tensors}
    dim = int(_field(reader, a + "embedding_length"))
    vocab = int(_field(reader, a + "vocab_size", 0) or len(_field(reader, "tokenizer.ggml.tokens")))
    cfg = LlamaConfig(
        vocab_size=vocab, dim=dim, n_layers=int(_field(reader, a + "block_count")),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=int(_field(reader, a + "attention.key_length", dim // n_heads)),
        hidden_dim=int(_field(reader, a + "feed_forward_length")),
        # stored as float32 (9.9999997e-06): round back to the decimal the model was made with
        norm_eps=float(f"{_field(reader, a + 'attention.layer_norm_rms_epsilon', 1e-5):.6g}"),
        rope_theta=float(_field(reader, a + "rope.freq_base", 10000.0)),
        max_seq_len=int(_field(reader, a + "context_length", 2048)),
        tie_embeddings="output.weight" not in names,
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"), eos_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )
    sd = {}
    for t in reader.tensors:
        hf = rename(t.name, GGUF_MAP)
        if hf is None:
            if t.name == "rope_freqs.weight":
                raise CheckpointError(path, "GGUF rope_freqs (llama3 scaling) is not supported yet")
            raise CheckpointError(path, f"unexpected GGUF tensor {t.name!r}")
        w = gguf.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        if ".q_proj." in hf:
            w = unpermute(w, n_heads)
        elif ".k_proj." in hf:
            w = unpermute(w, n_kv)
        sd[hf] = torch.from_numpy(np.array(w, copy=not w.flags.writeable or not w.flags.c_contiguous))
    return cfg, sd, reader


def convert_gguf_to_dir(gguf_path, out_dir, log=lambda m: print(f"[nanoabsorber] {m}")) -> Path:
    """Write out_dir/{config.json, model.safetensors, tokenizer.json} atomically: everything goes
    to a temporary sibling folder that is renamed into place only when complete."""
    from .tokenizer import ByteBPETokenizer

    out_dir = Path(out_dir)
    t0 = time.time()
    cfg, sd, reader = read_gguf(gguf_path)
    tok = ByteBPETokenizer.from_gguf(reader)
    with atomic_dir(out_dir) as tmp:
        hf_cfg = cfg.to_hf()
        hf_cfg["torch_dtype"] = "float32"
        atomic_write_text(tmp / "config.json", json.dumps(hf_cfg, indent=2))
        tok.save_tokenizer_json(tmp / "tokenizer.json")
        inv = {i: t for t, i in tok.special_tokens.items()}
        tok_cfg = {"chat_template": tok.chat_template, "bos_token": inv.get(tok.bos_id),
                   "eos_token": inv.get(tok.eos_id), "pad_token": inv.get(tok.pad_id),
                   "add_bos_token": tok.add_bos, "model_max_length": cfg.max_seq_len,
                   "tokenizer_class": "GPT2Tokenizer"}
        atomic_write_text(tmp / "tokenizer_config.json", json.dumps(tok_cfg, indent=2))
        atomic_save_safetensors(sd, tmp / "model.safetensors", metadata={"format": "pt", "source": Path(gguf_path).name})
        atomic_write_text(tmp / "SOURCE.txt", f"converted by nanoabsorber from {Path(gguf_path).name}\n")
    log(f"converted {Path(gguf_path).name} -> {out_dir} in {time.time() - t0:.1f}s")
    return out_dir
