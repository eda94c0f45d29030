"""What absorption and inference cost: wall time and peak memory, each measured in a fresh Python
process (so that nothing earlier pollutes the peak), and the environment the numbers came from.

    run_isolated({"kind": "absorb", "run": asdict(run_cfg), "cfg": asdict(absorb_cfg), "text": text})
    run_isolated({"kind": "inference", "run": ..., "lora": asdict(lora_cfg), "mode": "full" | "absorbed",
                  "ids": ids, "window": W, "decode_tokens": 32})
    with PeakMemory("cpu") as mem: ...; mem.as_dict()
    environment("cpu")                       # versions, commit, machine, torch threads
"""
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from .model import kv_cache_bytes

# ------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """RSS high-water mark: VmHWM (resettable) on Linux, else getrusage's ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class PeakMemory:
    """Peak memory of a block of work: RSS high-water (CPU) or max_memory_allocated (CUDA),
    as total and as extra over the level when the block started."""

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")

    def __enter__(self):
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.hwm_reset = reset_peak_rss()
            self.start = rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = peak_rss_bytes()
        self.extra = max(0, self.peak - self.start)
        return False

    def as_dict(self) -> dict:
        return {"memory_kind": "cuda max_memory_allocated" if self.cuda else
                ("RSS high-water (VmHWM, reset)" if self.hwm_reset else "RSS high-water (ru_maxrss)"),
                "memory_start_bytes": self.start, "memory_peak_bytes": self.peak, "memory_extra_bytes": self.extra}


def process_peak_bytes(device: str) -> int:
    """Peak memory of this process so far: max_memory_allocated on CUDA, RSS high-water on CPU."""
    return torch.cuda.max_memory_allocated() if str(device).startswith("cuda") else peak_rss_bytes()


@torch.no_grad()
def prefill_seconds(model, ids: list[int], repeats: int = 2, chunk: int = 512) -> float:
    """Wall time of prefilling `ids` into a fresh KV cache (as generation does), best of `repeats`."""
    dev = model.embed.weight.device
    best = float("inf")
    for _ in range(repeats):
        cache = model.new_cache(1, len(ids))
        _sync(dev)
        t0 = time.perf_counter()
        for s in range(0, len(ids), chunk):
            model(torch.tensor([ids[s:s + chunk]], device=dev), cache=cache)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


# ------------------------------------------------------------------------------------------
# Measurement processes
# ------------------------------------------------------------------------------------------

def _setup_worker(spec: dict):
    from . import load
    from .cli import RunConfig, setup
    from .config import from_dict

    run_cfg = from_dict(RunConfig, spec["run"])
    setup(run_cfg)
    model, tok = load(run_cfg.ckpt, device=run_cfg.device, dtype=run_cfg.dtype)
    # a short forward first: it pages in every weight (loads may be memory-mapped, and untouched
    # pages are not resident yet) and initialises the math libraries, so that neither is
    # counted as memory or time of the measured work
    with torch.no_grad():
        model(torch.zeros((1, 8), dtype=torch.long, device=model.embed.weight.device))
    return model, tok, run_cfg.device


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def worker_absorb_cost(spec: dict) -> dict:
    """Absorb spec["text"] with spec["cfg"] (an asdict'ed AbsorbConfig, its probes and LoRA
    included); report wall time and peak memory of the absorption alone."""
    from .absorber import AbsorbConfig, absorb_text
    from .config import from_dict
    from .lora import apply_lora, reset_lora

    model, tok, device = _setup_worker(spec)
    cfg = from_dict(AbsorbConfig, spec["cfg"])
    apply_lora(model, cfg.lora)
    reset_lora(model, cfg.seed)
    n_tokens = len(tok.encode(spec["text"]))
    with PeakMemory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        res = absorb_text(model, tok, spec["text"], cfg)
        _sync(device)
        secs = time.perf_counter() - t0
    steps = sum(r.steps for r in res)
    return {"tokens": n_tokens, "windows": len(res), "steps": steps, "seconds": secs,
            "seconds_per_1k_tokens": secs / n_tokens * 1000, "seconds_per_step": secs / max(steps, 1),
            **mem.as_dict()}


def worker_inference_cost(spec: dict) -> dict:
    """Prefill a context, then decode spec["decode_tokens"] tokens greedily; report per-token
    decode latency and peak memory. mode "full": the whole context in the KV cache; mode
    "absorbed": LoRA (spec["lora"], an asdict'ed LoRAConfig) applied and merged, only the last
    `window` tokens in the KV cache."""
    from .config import from_dict
    from .lora import LoRAConfig, apply_lora, merge_lora
    from .sampling import generate

    model, _, device = _setup_worker(spec)
    ids = spec["ids"]
    if spec["mode"] == "absorbed":
        apply_lora(model, from_dict(LoRAConfig, spec["lora"]))
        merge_lora(model)
        ids = ids[-spec["window"]:]
    times = []
    with PeakMemory(device) as mem:
        with torch.inference_mode():
            _sync(device)
            t = time.perf_counter()
            for _ in generate(model, ids, spec["decode_tokens"], 0.0, stop_ids=()):
                _sync(device)
                now = time.perf_counter()
                times.append(now - t)
                t = now
    decode = sorted(times[1:]) or times     # times[0] includes the prefill
    elt = model.embed.weight.element_size()
    return {"tokens_in_window": len(ids), "prefill_seconds": times[0], "decode_tokens": len(times) - 1,
            "decode_ms_per_token": 1000 * sum(decode) / len(decode),
            "decode_ms_per_token_median": 1000 * decode[len(decode) // 2],
            "kv_cache_bytes": kv_cache_bytes(model.cfg, len(ids) + spec["decode_tokens"], elt),
            **mem.as_dict()}


WORKERS = {"absorb": worker_absorb_cost, "inference": worker_inference_cost}


def worker_main() -> None:
    """Entry point of a measurement process: one JSON spec on stdin, one JSON line on stdout."""
    spec = json.loads(sys.stdin.read())
    out = WORKERS[spec["kind"]](spec)
    sys.stdout.write("\n@@result " + json.dumps(out) + "\n")


def run_isolated(spec: dict, timeout: Optional[float] = None) -> dict:
    """Run one measurement in a fresh Python process (same interpreter, the installed package)
    and return its result; RuntimeError with the worker's last error line on failure."""
    env = dict(os.environ, NANOABSORBER_QUIET="1")
    cmd = [sys.executable, "-c", "from nanoabsorber.cost import worker_main; worker_main()"]
    p = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, env=env, timeout=timeout)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("@@result "):
            return json.loads(line[len("@@result "):])
    err = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    why = err[-1] if err else f"exit status {p.returncode}"
    raise RuntimeError(f"measurement process ({spec['kind']}) failed: {why}")


# ------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------

def _git(*args) -> Optional[str]:
    """git's output in the package's source tree, or None (not a checkout, no git)."""
    try:
        r = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict:
    """Versions, commit, machine and the torch threads in use: where a result came from."""
    import numpy

    from . import __version__

    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
           "torch": torch.__version__, "numpy": numpy.__version__, "nanoabsorber": __version__,
           "git_commit": commit, "git_dirty": bool(dirty) if dirty is not None else None,
           "platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        import matplotlib

        env["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    return env
