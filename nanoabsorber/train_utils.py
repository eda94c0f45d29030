"""train.py's settings and the pieces of it worth testing on their own: model presets, the
learning-rate schedule, saving a LoRA model merged, and the training-state file.

Settings: TrainConfig groups them (data, model, LoRA, optimization, evaluation/logging,
system); each field declares its default, help and check once, and train.py builds its flags
from them (nanoabsorber.config). Settings whose default depends on others (lr, min-lr,
decay-steps, dtype) are None until TrainConfig.resolved() makes them concrete.

The training state is one safetensors file (never pickle):
  param.<name>              trainable parameters (all of them, or only the LoRA ones)
  optim.<name>.<key>        AdamW state per parameter (step, exp_avg, exp_avg_sq)
  rng.torch.rank<r>         torch CPU RNG state (uint8) of every rank
  rng.cuda.rank<r>          CUDA RNG state of every rank's device, when on CUDA
and in its metadata, under "nanoabsorber.train_state", a JSON string with the step, the data
position, the model config, the run signature (what must match to resume) and the settings.
numpy and Python's `random` are not used for anything random (the data order is a pure function
of (seed, epoch)), so they have no state to keep.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open

from .config import folder_or_new, non_negative, positive, setting, validate
from .data import MIN_VOCAB
from .errors import CheckpointError, ConfigError
from .io import atomic_save_safetensors
from .lora import LoRAConfig
from .model import LlamaConfig

STATE_KEY = "nanoabsorber.train_state"
STATE_FILE = "train_state.safetensors"

# name -> model shape; parameters counted with a 4096-token vocabulary and tied embeddings
PRESETS = {
    "tiny": dict(dim=128, n_layers=4, n_heads=4),     # ~1.3M (0.8M without the embedding)
    "small": dict(dim=288, n_layers=8, n_heads=6),    # ~9.1M
    "medium": dict(dim=512, n_layers=12, n_heads=8),  # ~40M
}
DEFAULT_PRESET = "tiny"
LR_SCRATCH, LR_FINETUNE = 1e-3, 1e-4   # peak learning rate: from scratch or LoRA / full fine-tuning
SHAPE_FLAGS = ("preset", "n_layers", "dim", "n_heads", "n_kv_heads", "hidden_dim")


def hidden_dim_for(dim: int) -> int:
    """Llama's SwiGLU width: 8/3 * dim rounded up to a multiple of 32."""
    return 32 * math.ceil(8 * dim / 3 / 32)


def model_config(vocab_size: int, seq_len: int, dim: int, n_layers: int, n_heads: int, n_kv_heads=None,
                 hidden_dim=None, tie_embeddings: bool = True, bos_id=None, eos_id=None) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       hidden_dim=hidden_dim or hidden_dim_for(dim), max_seq_len=seq_len, norm_eps=1e-5,
                       rope_theta=10000.0, tie_embeddings=tie_embeddings, bos_id=bos_id, eos_id=eos_id)


# ----------------------------------------------------------------------------- settings

def _exists(v: str) -> str | None:
    return None if Path(v).exists() else "no such file or directory"


def _out_folder(v: str) -> str | None:
    if Path(v).suffix == ".safetensors":
        return "must be a folder (it gets model.safetensors, config.json, ...), not a .safetensors file"
    return folder_or_new(v)


def _unit(v: float) -> str | None:
    return None if 0 <= v < 1 else f"must be in [0, 1), not {v}"


def _at_least(lo: int):
    return lambda v: None if v >= lo else f"must be >= {lo}, not {v}"


@dataclass
class DataConfig:
    data: Optional[str] = setting(None, "a UTF-8 text file, or a folder of them (hidden files skipped); required",
                                  check=_exists, metavar="PATH")
    out: Optional[str] = setting(None, "output folder (checkpoint, tokenizer, training state, log); required",
                                 check=_out_folder, metavar="DIR")
    cache_dir: Optional[str] = setting(None, "where tokenized data is cached (automatic: beside the data, or the "
                                             "user cache if that folder is read-only)",
                                       check=folder_or_new, metavar="DIR")
    val_frac: float = setting(0.05, "fraction of tokens (at the end) held out for validation (0 = none)",
                              check=_unit)
    tokenizer: Optional[str] = setting(None, "use this tokenizer (folder or file) instead of training one",
                                       check=_exists, metavar="PATH")
    vocab_size: int = setting(4096, "vocabulary of the SentencePiece tokenizer trained on the data",
                              check=_at_least(MIN_VOCAB))

    def __post_init__(self):
        validate(self)
        for name in ("data", "out"):
            if getattr(self, name) is None:
                raise ConfigError(name, "is required")


@dataclass
class ModelConfig:
    init: Optional[str] = setting(None, "continue training this checkpoint: folder, .safetensors or .gguf "
                                        "('default' = the default model)",
                                  check=lambda v: None if v == "default" else _exists(v), metavar="CKPT")
    preset: Optional[str] = setting(None, f"model size: tiny ~1M, small ~10M, medium ~40M parameters "
                                          f"(automatic: {DEFAULT_PRESET})", choices=tuple(PRESETS))
    n_layers: Optional[int] = setting(None, "transformer blocks (overrides the preset)", check=positive)
    dim: Optional[int] = setting(None, "model width (overrides the preset)", check=positive)
    n_heads: Optional[int] = setting(None, "attention heads (overrides the preset)", check=positive)
    n_kv_heads: Optional[int] = setting(None, "key/value heads for grouped-query attention (automatic: n-heads)",
                                        check=positive)
    hidden_dim: Optional[int] = setting(None, "MLP width (automatic: 8/3 dim, rounded up to 32)", check=positive)
    tie_embeddings: bool = setting(True, "share the input embedding and the output head")
    seq_len: int = setting(256, "tokens per training sequence (a new model's max_seq_len)", check=positive)
    lora: bool = setting(False, "train LoRA adapters (--lora-rank ...) instead of all weights; needs --init")

    def __post_init__(self):
        validate(self)
        if self.init:
            given = next((n for n in SHAPE_FLAGS if getattr(self, n) is not None), None)
            if given:
                raise ConfigError(given, "cannot be combined with --init (the model's shape comes from the checkpoint)")
            return
        if self.lora:
            raise ConfigError("lora", "needs --init (LoRA adapts an existing model)")
        try:
            self.llama_config(vocab_size=MIN_VOCAB)       # a bad shape fails here, before any data work
        except ValueError as e:
            raise ConfigError("n_kv_heads" if "n_kv_heads" in str(e) else "n_heads", str(e)) from None

    def llama_config(self, vocab_size: int, bos_id=None, eos_id=None) -> LlamaConfig:
        """The config of a new model: the preset, with the given fields overriding it."""
        preset = PRESETS[self.preset or DEFAULT_PRESET]
        return model_config(vocab_size=vocab_size, seq_len=self.seq_len, dim=self.dim or preset["dim"],
                            n_layers=self.n_layers or preset["n_layers"], n_heads=self.n_heads or preset["n_heads"],
                            n_kv_heads=self.n_kv_heads, hidden_dim=self.hidden_dim,
                            tie_embeddings=self.tie_embeddings, bos_id=bos_id, eos_id=eos_id)


@dataclass
class OptimConfig:
    batch_size: int = setting(16, "sequences per forward pass, per process", check=positive)
    grad_accum: int = setting(1, "forward passes per optimizer step, in all (a multiple of the number of processes)",
                              check=positive)
    max_steps: int = setting(1000, "stop after this many optimizer steps", check=positive)
    lr: Optional[float] = setting(None, f"peak learning rate (automatic: {LR_SCRATCH:g} from scratch or with LoRA, "
                                        f"{LR_FINETUNE:g} full fine-tuning)", check=positive)
    min_lr: Optional[float] = setting(None, "learning rate at the end of the cosine (automatic: lr/10)",
                                      check=non_negative)
    warmup_steps: int = setting(100, "linear warmup steps", check=non_negative)
    decay_steps: Optional[int] = setting(None, "step where the cosine reaches min-lr (automatic: max-steps; keep it "
                                               "when extending a run)", check=positive)
    weight_decay: float = setting(0.1, "AdamW weight decay (matrices only)", check=non_negative)
    beta1: float = setting(0.9, "AdamW beta1", check=_unit)
    beta2: float = setting(0.95, "AdamW beta2", check=_unit)
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0 = off)", check=non_negative)

    def __post_init__(self):
        validate(self)


@dataclass
class LogConfig:
    eval_every: int = setting(100, "validation loss every this many steps (0 = only at the end)", check=non_negative)
    eval_batches: int = setting(20, "validation batches (of --batch-size) per evaluation", check=positive)
    log_every: int = setting(10, "progress line every this many steps", check=positive)
    save_every: int = setting(500, "checkpoint every this many steps (0 = only at the end)", check=non_negative)
    resume: bool = setting(False, "continue the run in --out from its last checkpoint")

    def __post_init__(self):
        validate(self)


@dataclass
class SystemConfig:
    dtype: Optional[str] = setting(None, "autocast dtype (automatic: bfloat16 on CUDA, float32 on CPU); weights "
                                         "stay float32", choices=("float32", "bfloat16"))
    seed: int = setting(1337, "random seed (model init, data order)", check=non_negative)

    def __post_init__(self):
        validate(self)


@dataclass
class TrainConfig:
    """Every setting of train.py (the device and threads come from nanoabsorber.cli.RunConfig)."""
    data: DataConfig = setting(default_factory=DataConfig, help="data")
    model: ModelConfig = setting(default_factory=ModelConfig, help="model")
    lora: LoRAConfig = setting(default_factory=LoRAConfig, help="LoRA (with --lora)", prefix="lora-")
    optim: OptimConfig = setting(default_factory=OptimConfig, help="optimization")
    log: LogConfig = setting(default_factory=LogConfig, help="evaluation, logging, checkpoints")
    system: SystemConfig = setting(default_factory=SystemConfig, help="precision and randomness")

    def __post_init__(self):
        if self.model.init and self.data.tokenizer:
            raise ConfigError("tokenizer", "cannot be combined with --init (the checkpoint's tokenizer is kept)")

    def resolved(self, device: str) -> "TrainConfig":
        """A copy with the automatic settings made concrete: lr, min-lr, decay-steps, dtype."""
        o = self.optim
        lr = o.lr or (LR_FINETUNE if self.model.init and not self.model.lora else LR_SCRATCH)
        optim = dataclasses.replace(o, lr=lr, min_lr=lr / 10 if o.min_lr is None else o.min_lr,
                                    decay_steps=o.decay_steps or o.max_steps)
        system = dataclasses.replace(self.system, dtype=self.system.dtype
                                     or ("bfloat16" if device.startswith("cuda") else "float32"))
        return dataclasses.replace(self, optim=optim, system=system)


# ----------------------------------------------------------------------------- schedule and optimizer

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

@contextlib.contextmanager
def lora_merged(model):
    """The LoRA updates merged into the weights for the block (to save a plain checkpoint with
    nanoabsorber.checkpoint.save_checkpoint); afterwards the exact former weights are put back,
    so training continues bit for bit. A model without LoRA is left as it is."""
    from .lora import lora_modules

    mods = [m for m in lora_modules(model) if not m.merged]
    kept = [m.weight.detach().clone() for m in mods]
    try:
        for m in mods:
            m.merge()
        yield model
    finally:
        with torch.no_grad():
            for m, w in zip(mods, kept):
                m.weight.copy_(w)
                m.merged = False


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
    atomic_save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path,
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


__all__ = ["PRESETS", "DEFAULT_PRESET", "STATE_FILE", "DataConfig", "ModelConfig", "OptimConfig", "LogConfig",
           "SystemConfig", "TrainConfig", "hidden_dim_for", "model_config", "get_lr", "param_groups",
           "lora_merged", "weights_sha256", "optimizer_tensors", "load_optimizer_tensors",
           "save_train_state", "read_train_state_info", "read_train_state", "signature_diff"]
