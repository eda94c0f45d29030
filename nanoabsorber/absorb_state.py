"""What an absorption run is (its signature) and where an interrupted one stands.

After every finished window absorb.py saves `<out>.partial`: an ordinary adapter file (the LoRA
after that window, written atomically) whose metadata also holds the run's signature and how many
windows are done. `--resume` loads it and continues with the next window; since every window's
randomness is seeded by the window itself (Y subsets, generated Y) and each window starts a fresh
optimizer, the finished adapter equals the one an uninterrupted run writes. The finished adapter
carries the signature too, so a rerun can tell a finished document from a changed one.

A signature is {source_sha256, config (the resolved AbsorbConfig), start_adapter (sha256 of the
--adapter file absorption went on from, or null)}; the base model is checked by the adapter's own
fingerprint when it is loaded.
"""
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from .errors import UserError

KEY = "nanoabsorber.absorb_state"


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def signature(text: str, cfg, start_adapter=None) -> dict:
    """The run's identity: the text, the resolved recipe and the adapter it starts from."""
    return {"source_sha256": hashlib.sha256(text.encode()).hexdigest(), "config": asdict(cfg),
            "start_adapter": file_sha256(start_adapter) if start_adapter else None}


def partial_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def state_meta(sig: dict, windows_done: int, windows: int) -> dict:
    """Adapter metadata entries that record a run's signature and progress."""
    return {KEY: json.dumps({"signature": sig, "windows_done": windows_done, "windows": windows})}


def read_state(path) -> dict:
    """{signature, windows_done, windows} from an adapter or partial file; UserError if absent."""
    from .lora import read_adapter

    _, md = read_adapter(path)
    if KEY not in md:
        raise UserError(f"{path}: not written by absorb.py (no run signature)")
    return json.loads(md[KEY])


def differences(saved: dict, now: dict) -> list[str]:
    """Which parts of two signatures differ ('source', 'start adapter', 'config: steps', ...)."""
    out = []
    if saved["source_sha256"] != now["source_sha256"]:
        out.append("the text to absorb")
    if saved["start_adapter"] != now["start_adapter"]:
        out.append("the --adapter it starts from")
    a, b = saved["config"], now["config"]
    out += [f"--{k.replace('_', '-')} ({a.get(k)!r} then, {b.get(k)!r} now)" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]
    return out


def resume_point(out, sig: dict) -> tuple[Path, int]:
    """(partial file, windows done) of an interrupted run with this signature; a one-line
    UserError if there is none or it was a different run."""
    part = partial_path(out)
    if not part.exists():
        raise UserError(f"{part}: nothing to resume (no interrupted absorption for {out})")
    state = read_state(part)
    diff = differences(state["signature"], sig)
    if diff:
        raise UserError(f"{part}: cannot resume: it absorbed with a different {diff[0]}"
                        + (f" and {len(diff) - 1} more difference(s)" if len(diff) > 1 else "")
                        + "; rerun without --resume to start over")
    return part, state["windows_done"]


def is_finished(out, sig: dict) -> bool:
    """Whether `out` is a finished adapter of exactly this run (a rerun can skip it)."""
    try:
        state = read_state(out)
    except Exception:
        return False
    return state["windows_done"] == state["windows"] and not differences(state["signature"], sig)
