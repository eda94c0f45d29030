"""nanoabsorber: absorb long contexts into a Llama's weights at test time (Absorber LLM).

    from nanoabsorber import load
    model, tokenizer = load()            # the default model, SmolLM2-135M-Instruct
    logits = model(idx)                  # (B, T, vocab)
    logits, hidden = model(idx, hidden=True)   # hidden: [h0 (embeddings), h1, ..., hL]
"""
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_model, save_checkpoint
from .model import KVCache, Llama, LlamaConfig

__version__ = "0.1.0"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def load(path=None, device="cpu", dtype=torch.float32, tokenizer: bool = True):
    """Load a checkpoint and its tokenizer. path=None loads the default model.
    Returns (model, tokenizer); tokenizer is None when tokenizer=False."""
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if path is None:
        from .default_model import default_model_dir

        path = default_model_dir()
    model, folder = load_model(path, device=device, dtype=dtype)
    tok = None
    if tokenizer:
        from .tokenizer import ByteBPETokenizer, load_tokenizer

        if Path(path).suffix == ".gguf":
            tok = ByteBPETokenizer.from_gguf(str(path))
        else:
            tok = load_tokenizer(folder)
    return model, tok


__all__ = ["load", "Llama", "LlamaConfig", "KVCache", "CheckpointError", "save_checkpoint", "DTYPES"]
