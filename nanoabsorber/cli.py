"""Small helpers shared by the scripts: common flags, a resolved-config printout, and one-line
errors (no tracebacks from deep inside torch for bad input)."""
import argparse
import json
import sys

import torch


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


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
    """A text file's contents, or a one-line UserError naming the file and the problem."""
    try:
        raw = open(path, "rb").read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a text file") from None
    return decode_text(raw, path)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", default=None,
                   help="checkpoint: HF-layout folder, .safetensors file or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (weights are cast on load)")
    p.add_argument("--attn", default="auto", choices=["auto", "sdpa", "triton"],
                   help="attention path: auto (= SDPA), sdpa, or triton (our kernel, CUDA)")


def print_config(name: str, args: argparse.Namespace) -> None:
    cfg = {k: v for k, v in vars(args).items()}
    print(f"{name} " + json.dumps(cfg, default=str), file=sys.stderr, flush=True)


def run(main) -> None:
    """Call main(); turn known user-facing errors into one line on stderr and exit status 2."""
    from .checkpoint import CheckpointError

    try:
        from .tokenizer import TokenizerError
    except ImportError:  # pragma: no cover
        TokenizerError = ValueError
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (CheckpointError, TokenizerError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as e:
        print(f"error: {e.filename}: no such file", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        # our own RuntimeErrors are one-liners; torch's are long: keep the first line
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(1)
