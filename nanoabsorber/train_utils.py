"""Pieces of train.py that are worth testing on their own: model presets, the learning-rate
schedule, checkpoint writing (LoRA merged on the fly) and the training-state file.

The training state is one safetensors file (never pickle):
  param.<name>              trainable parameters (all of them, or only the LoRA ones)
  optim.<name>.<key>        AdamW state per parameter (step, exp_avg, exp_avg_sq)
  rng.torch.rank<r>         torch CPU RNG state (uint8) of every rank
  rng.cuda.rank<r>          CUDA RNG state of every rank's device, when on CUDA
and in its metadata, under "nanoabsorber.train_state", a JSON string with the step, the data
position, the model config, the run signature (what must match to resume) and the arguments.
numpy and Python's `random` are not used for anything random (the data order is a pure function
of (seed, epoch)), so they have no state to keep.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import CONFIG_KEY, CheckpointError, atomic_save_file, atomic_write_text, hf_state_dict, ours_to_hf
from .model import LlamaConfig

STATE_KEY = "nanoabsorber.train_state"
STATE_FILE = "train_state.safetensors"

# name -> model shape; parameters counted with a 4096-token vocabulary and tied embeddings
PRESETS = {
    "tiny": dict(dim=128, n_layers=4, n_heads=4),     # ~1.3M (0.8M without the embedding)
    "small": dict(dim=288, n_layers=8, n_heads=6),    # ~9.1M
    "medium": dict(dim=512, n_layers=12, n_heads=8),  # ~40M
}


def hidden_dim_for(dim: int) -> int:
    """Llama's SwiGLU width: 8/3 * dim rounded up to a multiple of 32."""
    return 32 * math.ceil(8 * dim / 3 / 32)


def model_config(vocab_size: int, seq_len: int, dim: int, n_layers: int, n_heads: int, n_kv_heads=None,
                 hidden_dim=None, tie_embeddings: bool = True, bos_id=None, eos_id=None) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       hidden_dim=hidden_dim or hidden_dim_for(dim), max_seq_len=seq_len, norm_eps=1e-5,
                       rope_theta=10000.0, tie_embeddings=tie_embeddings, bos_id=bos_id, eos_id=eos_id)


def get_lr(step: int, lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    """Linear warmup to lr over `warmup` steps (step 0 already gets lr/(warmup+1)), then cosine
    decay to min_lr at `decay_steps`, constant min_lr after."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup) / max(1, decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def param_groups(model, weight_decay: float) -> tuple[list[dict], list[str]]:
    """AdamW groups (matrices decay; norms, biases and 1-D LoRA-free vectors do not) and the
    parameter names in optimizer order."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append((name, p))
    groups = [{"params": [p for _, p in decay], "weight_decay": weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]], [n for n, _ in decay + no_decay]


# ----------------------------------------------------------------------------- checkpoints

def merged_hf_state_dict(model, dtype=None) -> dict:
    """The model's weights under HF names with every LoRA update added in (out of place: the
    training model is not touched, so training continues bit-for-bit)."""
    from .lora import LoRALinear

    sd = hf_state_dict(model, dtype)
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear) and not mod.merged:
            key = ours_to_hf(name + ".weight")
            sd[key] = (sd[key].float() + mod.delta_weight().detach().float().cpu()).to(sd[key].dtype).contiguous()
    return sd


def save_model(model, out_dir, extra_metadata: dict | None = None) -> Path:
    """out_dir/model.safetensors (config in its metadata) + config.json, both atomic: a folder
    that nanoabsorber.load and sample.py read as it is. LoRA, if any, is merged in."""
    out_dir = Path(out_dir)
    meta = {CONFIG_KEY: json.dumps(model.cfg.to_dict()), "format": "pt"}
    meta.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    atomic_write_text(out_dir / "config.json", json.dumps(model.cfg.to_hf(), indent=2))
    path = out_dir / "model.safetensors"
    atomic_save_file(merged_hf_state_dict(model), path, metadata=meta)
    return path


def weights_sha256(model) -> str:
    """sha256 of every parameter's bytes (names sorted): equal iff the weights are bit-equal."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- training state

def optimizer_tensors(opt: torch.optim.Optimizer, names: list[str]) -> dict:
    """AdamW state flattened to {"optim.<param name>.<key>": tensor}."""
    sd = opt.state_dict()["state"]
    out = {}
    for i, name in enumerate(names):
        for key, v in sd.get(i, {}).items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            out[f"optim.{name}.{key}"] = t.detach().cpu().contiguous()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, names: list[str], tensors: dict) -> None:
    """Inverse of optimizer_tensors (param_groups come from the freshly built optimizer)."""
    state = {}
    for i, name in enumerate(names):
        prefix = f"optim.{name}."
        entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if entry:
            state[i] = entry
    known = {f"optim.{n}." for n in names}
    stray = [k for k in tensors if k.startswith("optim.") and not any(k.startswith(p) for p in known)]
    if stray:
        raise ValueError(f"optimizer state for unknown parameter {stray[0]!r}")
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


def save_train_state(path, tensors: dict, info: dict) -> None:
    atomic_save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path,
                     metadata={STATE_KEY: json.dumps(info), "format": "pt"})


def read_train_state_info(path) -> dict:
    """The JSON part of a training-state file (cheap: tensors are not read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"not a readable training-state file ({str(e).splitlines()[0]})") from None
    if STATE_KEY not in meta:
        raise CheckpointError(path, "not a nanoabsorber training-state file")
    try:
        return json.loads(meta[STATE_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"corrupt training-state metadata ({e})") from None


def read_train_state(path) -> tuple[dict, dict]:
    """(tensors, info) of a training-state file."""
    info = read_train_state_info(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"corrupt training-state file ({str(e).splitlines()[0]})") from None
    return tensors, info


def signature_diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested run signatures: 'key: saved X, now Y'."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += signature_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: saved {a}, now {b}")
    return out


def format_duration(s: float) -> str:
    s = int(max(0, s))
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


__all__ = ["PRESETS", "STATE_FILE", "hidden_dim_for", "model_config", "get_lr", "param_groups",
           "merged_hf_state_dict", "save_model", "weights_sha256", "optimizer_tensors", "load_optimizer_tensors",
           "save_train_state", "read_train_state_info", "read_train_state", "signature_diff", "format_duration"]
