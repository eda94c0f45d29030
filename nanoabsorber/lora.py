"""LoRA written by hand: LoRALinear is an nn.Linear (the base weight keeps its key `weight`) plus
lora_A (r, in) initialised kaiming-uniform and lora_B (out, r) initialised to zero, so at init
the model equals the base model exactly. y = x W^T + b + (alpha / r) * dropout(x) A^T B^T.
merge() folds the update into W for zero-overhead inference; unmerge() takes it out again.

Adapters are saved as safetensors with metadata (rank, alpha, targets, base fingerprint, tokens
absorbed, source hash) and can be exported to the PEFT layout (adapter_config.json +
adapter_model.safetensors) for tools that serve PEFT LoRA adapters.
"""
import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import fingerprint, ours_to_hf
from .config import comma_list, in_range, positive, setting, validate
from .errors import CheckpointError
from .io import atomic_save_safetensors, atomic_write_text

# short target name -> module path inside a Block
TARGETS = {"q": "attn.wq", "k": "attn.wk", "v": "attn.wv", "o": "attn.wo",
           "gate": "mlp.gate", "up": "mlp.up", "down": "mlp.down"}
PEFT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
              "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass
class LoRAConfig:
    """The LoRA settings of absorb.py, eval.py and train.py (train.py prefixes them with lora-)."""
    rank: int = setting(16, "LoRA rank r", check=positive)
    alpha: float = setting(32.0, "LoRA alpha (the update is scaled by alpha / rank)", check=positive)
    targets: str = setting("all", "LoRA targets: comma list of q,k,v,o,gate,up,down, or all",
                           check=comma_list(("q", "k", "v", "o", "gate", "up", "down"), extra=("all",),
                                            empty_ok=False))
    dropout: float = setting(0.0, "dropout on the LoRA input", check=in_range(0.0, 0.99))

    def __post_init__(self):
        validate(self)


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 8,
                 alpha: float = 16.0, dropout: float = 0.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.merged = False
        self.reset_lora()

    @classmethod
    def from_linear(cls, lin: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> "LoRALinear":
        """Wrap an existing Linear: its weight/bias Parameters are reused (same keys, no copy)."""
        w = lin.weight
        with torch.device("meta"):
            new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, rank=rank,
                      alpha=alpha, dropout=dropout, dtype=w.dtype)
        new.weight = w
        new.bias = lin.bias
        # LoRA is kept in fp32 whatever the base dtype (bf16/fp16 base weights, fp32 adapter and
        # optimizer state): master weights in fp32, the product computed in the base dtype (forward)
        lora_dtype = torch.float32 if w.dtype in (torch.bfloat16, torch.float16) else w.dtype
        new.lora_A = nn.Parameter(torch.empty(rank, lin.in_features, device=w.device, dtype=lora_dtype))
        new.lora_B = nn.Parameter(torch.empty(lin.out_features, rank, device=w.device, dtype=lora_dtype))
        new.reset_lora()
        return new

    def reset_lora(self):
        """A kaiming-uniform (as nn.Linear does), B zero: the update starts at exactly 0."""
        if self.lora_A.device.type == "meta":
            return
        # drawn on the CPU (its generator, seeded by torch.manual_seed) and copied: the same seed gives
        # the same A on every device, so an adapter absorbed on a GPU starts where a CPU run does
        a = torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        with torch.no_grad():
            self.lora_A.copy_(a)
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale                 # (out, in)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        x = self.dropout(x)
        A, B = self.lora_A, self.lora_B
        if x.dtype != A.dtype:  # bf16/fp16 base, fp32 LoRA: the product in the base dtype (as autocast does),
            # the weights cast for it; gradients flow back to the fp32 master weights through the casts,
            # and backward keeps the input the base matmul keeps anyway, not an fp32 copy of it
            A, B = A.to(x.dtype), B.to(x.dtype)
        return y + (x @ A.T @ B.T) * self.scale

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self):
        return super().extra_repr() + f", rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def parse_targets(targets) -> tuple:
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if targets in (["all"], ("all",)):
        targets = list(TARGETS)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"unknown LoRA target(s) {bad or targets}; choose from {', '.join(TARGETS)} or 'all'")
    return tuple(t for t in TARGETS if t in targets)  # canonical order


def apply_lora(model, targets: Iterable[str] | LoRAConfig = tuple(TARGETS), rank: int = 16, alpha: float = 32.0,
               dropout: float = 0.0) -> list:
    """Swap the targeted Linears of every block for LoRALinear; freeze everything else.
    apply_lora(model, LoRAConfig(...)) or apply_lora(model, targets, rank, alpha, dropout)."""
    if isinstance(targets, LoRAConfig):
        targets, rank, alpha, dropout = targets.targets, targets.rank, targets.alpha, targets.dropout
    targets = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    mods = []
    for block in model.layers:
        for t in targets:
            parent_name, attr = TARGETS[t].split(".")
            parent = getattr(block, parent_name)
            lin = getattr(parent, attr)
            if isinstance(lin, LoRALinear):
                raise ValueError("LoRA is already applied to this model")
            new = LoRALinear.from_linear(lin, rank, alpha, dropout)
            setattr(parent, attr, new)
            mods.append(new)
    model.lora_config = {"rank": rank, "alpha": alpha, "targets": list(targets), "dropout": dropout}
    return mods


@contextlib.contextmanager
def lora_disabled(model):
    """Run the model as its base (every LoRA update scaled by 0) inside the block; merged LoRA is
    refused, since its update is in the weights."""
    mods = lora_modules(model)
    if any(m.merged for m in mods):
        raise ValueError("lora_disabled: unmerge the LoRA first")
    scales = [m.scale for m in mods]
    for m in mods:
        m.scale = 0.0
    try:
        yield model
    finally:
        for m, sc in zip(mods, scales):
            m.scale = sc


def lora_modules(model) -> list:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_parameters(model) -> list:
    return [p for m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model) -> dict:
    return {k: v.detach() for k, v in model.state_dict().items() if "lora_" in k}


def merge_lora(model):
    for m in lora_modules(model):
        m.merge()


def unmerge_lora(model):
    for m in lora_modules(model):
        m.unmerge()


def reset_lora(model, seed: Optional[int] = None):
    if seed is not None:
        torch.manual_seed(seed)
    for m in lora_modules(model):
        m.unmerge()
        m.reset_lora()


def base_fingerprint(model) -> str:
    """Fingerprint of the base weights (LoRA unmerged for the measurement)."""
    merged = [m for m in lora_modules(model) if m.merged]
    for m in merged:
        m.unmerge()
    try:
        return fingerprint(model)
    finally:
        for m in merged:
            m.merge()


def save_adapter(model, path, **meta) -> Path:
    """Write the LoRA tensors + metadata to one .safetensors file, atomically."""
    if not lora_modules(model):
        raise ValueError("the model has no LoRA to save")
    md = {"nanoabsorber.adapter": "1", "lora_config": json.dumps(model.lora_config),
          "base_fingerprint": base_fingerprint(model)}
    md.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()})
    tensors = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    atomic_save_safetensors(tensors, path, metadata=md)
    return Path(path)


def read_adapter(path) -> tuple[dict, dict]:
    """(tensors, metadata) of an adapter file; CheckpointError on anything wrong."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such adapter file")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if md.get("nanoabsorber.adapter") != "1" or "lora_config" not in md:
        raise CheckpointError(path, "not a nanoabsorber adapter (no lora_config in its metadata)")
    return tensors, md


def load_adapter(model, path, merge: bool = False, check_base: bool = True) -> dict:
    """Apply (if needed) and load an adapter (a path, or a (tensors, metadata) pair from
    read_adapter or compose); refuse one trained on another base model. Returns its metadata."""
    if isinstance(path, (str, Path)):
        tensors, md = read_adapter(path)
    else:
        (tensors, md), path = path, "composed adapter"
    lc = json.loads(md["lora_config"])
    if check_base:
        fp = base_fingerprint(model)
        if md.get("base_fingerprint") != fp:
            raise CheckpointError(path, f"adapter was made for another base model (fingerprint "
                                        f"{md.get('base_fingerprint')}, this model is {fp})")
    if not lora_modules(model):
        apply_lora(model, lc["targets"], lc["rank"], lc["alpha"])
    expected = lora_state_dict(model)
    if set(expected) != set(tensors):
        raise CheckpointError(path, "adapter tensors do not match this model's LoRA layout")
    for k, t in tensors.items():
        if t.shape != expected[k].shape:
            raise CheckpointError(path, f"adapter tensor {k} has shape {tuple(t.shape)}, expected {tuple(expected[k].shape)}")
    unmerge_lora(model)
    model.load_state_dict({k: t.to(expected[k].device, expected[k].dtype) for k, t in tensors.items()}, strict=False)
    if merge:
        merge_lora(model)
    return md


def write_adapter(tensors: dict, metadata: dict, path) -> Path:
    """Write (tensors, metadata), e.g. from compose, as an adapter file, atomically."""
    atomic_save_safetensors({k: v.to("cpu").contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return Path(path)


def compose(adapters, weights=None) -> tuple[dict, dict]:
    """One adapter whose update is the sum of the given adapters' updates, by concatenation along
    the rank: A = [A_1; A_2; ...] (rows), B = [s_1 B_1, s_2 B_2, ...] (columns) with each scale
    s_i = alpha_i / r_i folded into its B, so B A = sum_i s_i B_i A_i for any ranks and alphas
    (weights: optional factors w_i, folded in the same way: sum_i w_i s_i B_i A_i).
    The result has rank R = sum r_i and alpha R (scale 1), in fp32. Each adapter is a path or a
    (tensors, metadata) pair from read_adapter; all must be made for the same base model
    (fingerprint) with the same targets. Returns (tensors, metadata): load_adapter(model, it),
    write_adapter(*it, path)."""
    adapters = list(adapters)
    if not adapters:
        raise ValueError("compose: no adapters given")
    names = [str(a) if isinstance(a, (str, Path)) else f"adapter {i + 1}" for i, a in enumerate(adapters)]
    loaded = [read_adapter(a) if isinstance(a, (str, Path)) else a for a in adapters]
    cfgs = [json.loads(md["lora_config"]) for _, md in loaded]
    t0, md0, c0 = loaded[0][0], loaded[0][1], cfgs[0]
    for name, (t, md), c in zip(names[1:], loaded[1:], cfgs[1:]):
        if md.get("base_fingerprint") != md0.get("base_fingerprint"):
            raise CheckpointError(name, f"made for another base model than {names[0]} (fingerprint "
                                        f"{md.get('base_fingerprint')} vs {md0.get('base_fingerprint')})")
        if list(c["targets"]) != list(c0["targets"]) or set(t) != set(t0):
            raise CheckpointError(name, f"targets {','.join(c['targets'])} differ from {names[0]}'s "
                                        f"{','.join(c0['targets'])}")
    weights = [1.0] * len(loaded) if weights is None else [float(w) for w in weights]
    if len(weights) != len(loaded):
        raise ValueError(f"compose: {len(weights)} weights for {len(loaded)} adapters")
    scales = [w * c["alpha"] / c["rank"] for w, c in zip(weights, cfgs)]
    rank = sum(c["rank"] for c in cfgs)
    out = {}
    for k in sorted(t0):
        if k.endswith("lora_A"):
            out[k] = torch.cat([t[k].float() for t, _ in loaded], 0)                       # (R, in)
        elif k.endswith("lora_B"):
            out[k] = torch.cat([t[k].float() * s for (t, _), s in zip(loaded, scales)], 1)  # (out, R)
        else:
            raise CheckpointError(names[0], f"unexpected adapter tensor {k}")
    parts = [{"name": Path(n).name, "rank": c["rank"], "alpha": c["alpha"], "weight": w,
              **{k: md[k] for k in ("source_name", "source_sha256", "tokens_absorbed") if k in md}}
             for n, (_, md), c, w in zip(names, loaded, cfgs, weights)]
    md = {"nanoabsorber.adapter": "1", "base_fingerprint": md0.get("base_fingerprint", ""),
          "lora_config": json.dumps({"rank": rank, "alpha": float(rank), "targets": list(c0["targets"]),
                                     "dropout": 0.0}),
          "composed_from": json.dumps(parts)}
    tokens = [json.loads(m["tokens_absorbed"]) for _, m in loaded if "tokens_absorbed" in m]
    if len(tokens) == len(loaded):
        md["tokens_absorbed"] = json.dumps(sum(tokens))
    return out, md


def export_peft(model, out_dir, base_model_name: str) -> Path:
    """Write adapter_config.json + adapter_model.safetensors with PEFT's tensor names:
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight, ... (A: (r, in), B: (out, r)).
    base_model_name: the checkpoint actually used, so that a server pairs the adapter with its base."""
    lc = model.lora_config
    out_dir = Path(out_dir)
    tensors = {}
    for k, v in lora_state_dict(model).items():
        base, which = k.rsplit(".", 1)                      # layers.0.attn.wq, lora_A
        hf = ours_to_hf(base + ".weight")[: -len(".weight")]  # model.layers.0.self_attn.q_proj
        tensors[f"base_model.model.{hf}.{which}.weight"] = v.to("cpu").contiguous()
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lc["rank"], "lora_alpha": lc["alpha"],
           "lora_dropout": lc.get("dropout", 0.0), "target_modules": [PEFT_NAMES[t] for t in lc["targets"]],
           "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
           "base_model_name_or_path": base_model_name, "use_rslora": False}
    atomic_save_safetensors(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    atomic_write_text(out_dir / "adapter_config.json", json.dumps(cfg, indent=2))
    return out_dir
