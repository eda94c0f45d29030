"""Independent check of model.py against Hugging Face transformers' LlamaForCausalLM (fp32).

Not part of the test suite (transformers is not a dependency). Run it in a separate venv that has
torch + transformers + safetensors, from the repo root:
    python scripts/check_against_hf.py
It compares logits (max abs difference) on random inputs for the default model and for random tiny
configs covering GQA, explicit head_dim, llama3 rope_scaling, attention/mlp bias, tied/untied heads.
"""
import sys
import tempfile
from pathlib import Path

import torch

from transformers import LlamaConfig as HFConfig, LlamaForCausalLM  # noqa: E402

from nanoabsorber.checkpoint import load_model  # noqa: E402
from nanoabsorber.default_model import default_model_dir  # noqa: E402


def compare(folder: Path, name: str, T: int = 64) -> float:
    ours, _ = load_model(folder)
    hf = LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32, attn_implementation="eager").eval()
    torch.manual_seed(0)
    idx = torch.randint(0, ours.cfg.vocab_size, (2, T))
    with torch.no_grad():
        d = (ours(idx) - hf(idx).logits).abs().max().item()
    print(f"{name:<48} max |logits diff| = {d:.2e}  {'OK' if d < 1e-4 else 'FAIL'}")
    return d


def tiny_hf(tmp: Path, **kw) -> Path:
    cfg = dict(vocab_size=211, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0)
    cfg.update(kw)
    torch.manual_seed(1)
    m = LlamaForCausalLM(HFConfig(**cfg)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(str(tmp), safe_serialization=True)
    return tmp


if __name__ == "__main__":
    worst = compare(default_model_dir(), "SmolLM2-135M-Instruct (converted GGUF)")
    cases = {
        "tiny GQA 4/2, untied": {},
        "tiny MHA, tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
        "tiny head_dim=32 (explicit), GQA 4/1": dict(head_dim=32, num_key_value_heads=1),
        "tiny llama3 rope_scaling": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                         rope_theta=500000.0),
        "tiny attention_bias + mlp_bias": dict(attention_bias=True, mlp_bias=True),
    }
    for name, kw in cases.items():
        with tempfile.TemporaryDirectory() as d:
            worst = max(worst, compare(tiny_hf(Path(d), **kw), name, T=200))
    print(f"worst: {worst:.2e}")
    sys.exit(0 if worst < 1e-4 else 1)
