"""nanoabsorber: absorb long contexts into a Llama's weights at test time (Absorber LLM).

    from nanoabsorber import load
    model, tokenizer = load()            # the default model, SmolLM2-135M-Instruct
    logits = model(idx)                  # (B, T, vocab)
    logits, hidden = model(idx, hidden=True)   # hidden: [h0 (embeddings), h1, ..., hL]
"""
from pathlib import Path

import torch

from .checkpoint import load_model, save_checkpoint
from .errors import CheckpointError, ConfigError, UserError
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
    model, source = load_model(path, device=device, dtype=dtype)   # source: folder, or the parsed GGUF
    tok = None
    if tokenizer:
        from .tokenizer import ByteBPETokenizer, load_tokenizer

        tok = load_tokenizer(source) if isinstance(source, Path) else ByteBPETokenizer.from_gguf(source)
    return model, tok


__all__ = ["load", "Llama", "LlamaConfig", "KVCache", "CheckpointError", "ConfigError", "UserError", "save_checkpoint",
           "DTYPES"]
