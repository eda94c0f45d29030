"""What every script shares: the model/run settings (RunConfig, flags built from it), reading
user text files with one-line errors, and `run(main)`, which turns every user-facing error into
one line on stderr with exit status 2 (no traceback)."""
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from .config import Parser, add_flags, build, positive, print_config, setting, validate
from .errors import UserError

__all__ = ["RunConfig", "Parser", "add_flags", "build", "print_config", "read_text_file", "decode_text", "run",
           "UserError", "setup"]


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class RunConfig:
    """Which model, where and how it runs (all scripts that load a model)."""
    ckpt: Optional[str] = setting(None, "checkpoint: HF-layout folder, .safetensors file or .gguf "
                                        "(automatic: SmolLM2-135M-Instruct, the default model)")
    device: str = setting(default_factory=_default_device, help="cpu, cuda or cuda:N",
                         check=lambda v: None if v == "cpu" or v.split(":")[0] == "cuda" else "must be cpu or cuda")
    dtype: str = setting("float32", "compute dtype (weights are cast on load)",
                         choices=("float32", "bfloat16", "float16"))
    attn: str = setting("auto", "attention path: auto (= SDPA), sdpa, or triton (our kernel, CUDA)",
                        choices=("auto", "sdpa", "triton"))
    threads: Optional[int] = setting(None, "CPU threads for torch (automatic: torch's choice)", check=positive)

    def __post_init__(self):
        validate(self)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            from .errors import ConfigError

            raise ConfigError("device", "cuda is not available on this machine")


def setup(run_cfg: RunConfig) -> None:
    """Apply a RunConfig's process-wide settings: threads and the attention path."""
    from .attention import set_attention_impl

    if run_cfg.threads:
        torch.set_num_threads(run_cfg.threads)
    set_attention_impl(run_cfg.attn)


def format_duration(s: float) -> str:
    """12m05s, 1h02m03s: for progress lines and estimates."""
    s = int(max(0, s))
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def decode_text(raw: bytes, name) -> str:
    """UTF-8 text from bytes, or a one-line UserError naming `name` (binary, not UTF-8, empty)."""
    if b"\x00" in raw[:65536]:
        raise UserError(f"{name}: looks binary (NUL bytes); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{name}: not UTF-8 text (invalid byte at offset {e.start})") from None
    if not text.strip():
        raise UserError(f"{name}: is empty")
    return text


def read_text_file(path) -> str:
    """A text file's contents ('-' = stdin), or a one-line UserError naming the file and the problem."""
    if str(path) == "-":
        return decode_text(sys.stdin.buffer.read(), "<stdin>")
    try:
        raw = open(path, "rb").read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a text file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode_text(raw, path)


def read_json_file(path):
    """A JSON file's contents, or a one-line UserError."""
    import json

    text = read_text_file(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def check_output_path(path, what: str = "output") -> None:
    """Fail early (before any slow work) if the file `path` cannot be written where it is."""
    from pathlib import Path

    from .config import folder_or_new

    problem = folder_or_new(Path(path).parent) if str(Path(path).parent) else None
    if Path(path).is_dir():
        problem = "is a folder"
    if problem:
        raise UserError(f"{path}: cannot write the {what} here ({problem})")


def check_ckpt(run_cfg: RunConfig) -> None:
    """Fail early if --ckpt names nothing (the slow load reports deeper problems itself)."""
    from pathlib import Path

    if run_cfg.ckpt is not None and not Path(run_cfg.ckpt).exists():
        raise UserError(f"{run_cfg.ckpt}: no such checkpoint file or folder")


def run(main) -> None:
    """Call main(); turn user-facing errors into one line on stderr and exit status 2."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as e:
        print(f"error: {e.filename}: no such file", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        # our own RuntimeErrors are one-liners; torch's are long: keep the first line
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(1)
