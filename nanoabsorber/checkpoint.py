"""Checkpoint loading and saving: safetensors (single file, or shards from an index) and GGUF.

Accepted `path`s:
  - a Hugging Face-layout directory: config.json + model.safetensors, or sharded
    model-0000x-of-0000y.safetensors with model.safetensors.index.json; tokenizer beside it;
  - a single .safetensors file: config from its own metadata (files nanoabsorber wrote) or from
    a config.json beside it;
  - a .gguf file (llama architecture), dequantized to float.
Tensors use Hugging Face names on disk; NAME_MAP below maps them to ours. The model is built on
the meta device and loaded with assign=True after strict name and shape checks.
Never unpickles: .bin/.pt/.pth files are refused.
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError
from .gguf_convert import read_gguf
from .io import atomic_save_safetensors, atomic_write_text
from .model import Llama, LlamaConfig
from .names import hf_to_ours, ours_to_hf

CONFIG_KEY = "nanoabsorber.config"

# ----------------------------------------------------------------------------- reading

def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None


def _config_from_metadata_or_json(st_path: Path) -> tuple[LlamaConfig, Path]:
    meta = _safetensors_metadata(st_path)
    try:
        if meta and CONFIG_KEY in meta:
            return LlamaConfig.from_dict(json.loads(meta[CONFIG_KEY])), st_path
        cfg_path = st_path.parent / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(st_path, "no config in its metadata and no config.json beside it")
        return LlamaConfig.from_hf(_read_json(cfg_path)), cfg_path
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(st_path, f"bad config: {e}") from None


def _safetensors_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"not a readable safetensors file ({str(e).splitlines()[0]})") from None


def resolve(path) -> tuple[LlamaConfig, list[Path], Path]:
    """Find config and weight files for `path`. Returns (config, safetensors files, folder)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or directory")
    if path.is_file():
        if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
            raise CheckpointError(path, "pickle checkpoints are refused; convert to .safetensors")
        if path.suffix != ".safetensors":
            raise CheckpointError(path, "expected a .safetensors, .gguf file or a checkpoint directory")
        cfg, _ = _config_from_metadata_or_json(path)
        return cfg, [path], path.parent
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        wm = _read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(index, "no weight_map in the index")
        files = [path / f for f in sorted(set(wm.values()))]
        for f in files:
            if not f.exists():
                raise CheckpointError(f, "shard named in model.safetensors.index.json is missing")
    elif single.exists():
        files = [single]
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            if any(path.glob("*.bin")) or any(path.glob("*.pth")):
                raise CheckpointError(path, "only pickle weights here (.bin/.pth); nanoabsorber reads safetensors only")
            raise CheckpointError(path, "no model.safetensors, index or .safetensors file in this directory")
    cfg_path = path / "config.json"
    if cfg_path.exists():
        try:
            cfg = LlamaConfig.from_hf(_read_json(cfg_path))
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(cfg_path, f"bad config: {e}") from None
    else:
        cfg, _ = _config_from_metadata_or_json(files[0])
    return cfg, files, path


def read_state_dict(files: list[Path], dtype: torch.dtype) -> dict:
    """Read safetensors files into {our_name: tensor} cast to dtype; names checked."""
    sd = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for hf_name in st.keys():
                    ours = hf_to_ours(hf_name)
                    if ours is None:
                        if hf_name.endswith("rotary_emb.inv_freq"):
                            continue  # old HF checkpoints store this buffer; we recompute it
                        raise CheckpointError(f, f"unexpected tensor {hf_name!r}")
                    t = st.get_tensor(hf_name)
                    sd[ours] = t if t.dtype == dtype else t.to(dtype)
        except SafetensorError as e:
            raise CheckpointError(f, f"corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None
        except OSError as e:
            raise CheckpointError(f, f"cannot read ({e.strerror or e})") from None
    return sd


def build_model(cfg: LlamaConfig, sd: dict, source, device="cpu", dtype=torch.float32) -> Llama:
    """Build on the meta device, check names and shapes strictly, load with assign=True."""
    with torch.device("meta"):
        model = Llama(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("output.weight", None)
        sd.pop("output.weight", None)  # some tied checkpoints store a copy; the tie wins
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing:
        raise CheckpointError(source, f"missing tensor {ours_to_hf(missing[0])!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                              + " (does config.json match the weights?)")
    if extra:
        raise CheckpointError(source, f"unexpected tensor {ours_to_hf(extra[0])!r} (does config.json match the weights?)")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise CheckpointError(source, f"tensor {ours_to_hf(k)!r} has shape {tuple(sd[k].shape)}, "
                                  f"config expects {tuple(shape)}")
    model.load_state_dict({k: v.to(device) for k, v in sd.items()}, strict=not cfg.tie_embeddings, assign=True)
    model.tie_weights()
    return model.eval()


def load_model(path, device="cpu", dtype=torch.float32):
    """Load a checkpoint (see module docstring). Returns (model, where the tokenizer is): the
    folder for safetensors, the already-parsed GGUF reader for a .gguf (read once per load)."""
    path = Path(path)
    if path.suffix == ".gguf":
        cfg, hf_sd, reader = read_gguf(path)
        sd = {hf_to_ours(k): v.to(dtype) for k, v in hf_sd.items()}
        return build_model(cfg, sd, path, device, dtype), reader
    cfg, files, folder = resolve(path)
    sd = read_state_dict(files, dtype)
    return build_model(cfg, sd, files[0] if len(files) == 1 else folder, device, dtype), folder


# ----------------------------------------------------------------------------- writing

def hf_state_dict(model: Llama, dtype=None) -> dict:
    """Our model's weights under Hugging Face names (tied output head omitted), contiguous."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "output.weight" and model.cfg.tie_embeddings:
            continue
        if "lora_" in k:
            continue
        t = v.detach().to("cpu")
        out[ours_to_hf(k)] = (t.to(dtype) if dtype else t).contiguous()
    return out


def save_checkpoint(model: Llama, path, extra_metadata: dict | None = None, dtype=None) -> Path:
    """Write one .safetensors file with HF tensor names and our config in its metadata.
    If `path` is a directory (or has no .safetensors suffix), writes path/model.safetensors and
    a config.json so that Hugging Face-layout readers can use it too."""
    path = Path(path)
    meta = {CONFIG_KEY: json.dumps(model.cfg.to_dict()), "format": "pt"}
    meta.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    if path.suffix != ".safetensors":
        atomic_write_text(path / "config.json", json.dumps(model.cfg.to_hf(), indent=2))
        path = path / "model.safetensors"
    atomic_save_safetensors(hf_state_dict(model, dtype), path, metadata=meta)
    return path


def fingerprint(model: Llama) -> str:
    """A short hash of the base weights (a few strided samples of every tensor), used to refuse
    adapters trained on another base. Cheap: reads ~1k numbers per tensor."""
    import hashlib

    h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        if "lora_" in k:
            continue
        flat = v.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        h.update(k.encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
