"""Training data: plain text files -> (a SentencePiece tokenizer) -> one memory-mapped token file.

    files = list_data_files("corpus/")                  # a file, or every non-hidden file under a folder
    check_data_files(files)                             # DataError on empty / binary / non-UTF-8 input
    cache = cache_dir_for("corpus/")                    # corpus/.nanoabsorber-cache, or a user cache
    spm = train_sentencepiece(files, 4096, cache)       # tokenizer.model (byte fallback, BPE), cached
    tok = prepare_tokens(files, tokenizer, tokenizer_hash(spm), cache)  # uint16/uint32 .bin, cached
    data = TokenData(tok.path, tok.dtype, tok.n_tokens, seq_len=256, val_frac=0.05)
    loader = WindowLoader(data.n_train_windows, batch_windows=32, seed=1337)
    x, y = data.batch(loader.next())                    # (32, 256) int64 inputs and targets

Streaming: text is read in ~1 MB chunks cut at line ends, each chunk is encoded on its own and
appended to a temporary binary file that is renamed into place at the end, so a corpus never
has to fit in Python lists. With our SentencePiece models (no dummy prefix; a newline is its own
byte token) chunked encoding gives exactly the ids of whole-file encoding.

Cache: the token file is keyed by a hash of the data files (resolved path, size, mtime) and of
the tokenizer files. It lives in `.nanoabsorber-cache/` beside the data when that folder is
writable (has write permission bits: a read-only data folder is left alone even for root), else
in `$NANOABSORBER_CACHE/data` (~/.cache/nanoabsorber/data), or wherever `cache_dir` says.

Each file is one document: BOS before it when the tokenizer adds BOS (SentencePiece/Llama), EOS
after it when the tokenizer has one.

Batches: the training split is cut into non-overlapping windows of seq_len + 1 tokens; every
epoch visits them in a permutation fixed by (seed, epoch), so the data position is just
(epoch, pos) and a resumed run reads exactly what an uninterrupted one would.
"""
from __future__ import annotations

import codecs
import hashlib
import io
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import UserError
from .io import atomic_path, atomic_write, atomic_write_text

CACHE_SUBDIR = ".nanoabsorber-cache"
FORMAT_VERSION = 1          # bump when the token-file layout or document separators change
CHUNK_BYTES = 1 << 20       # text read and encoded per chunk
SPM_MAX_CHARS = 1000        # longer lines are cut for the SentencePiece trainer (it skips > 4192 bytes)
SPM_MAX_SENTENCES = 2_000_000
MIN_VOCAB = 256 + 3 + 1     # smallest SentencePiece vocabulary: 256 byte pieces, unk/bos/eos, one merge


class DataError(UserError):
    """Bad training data: printed as one line by nanoabsorber.cli.run."""


# ----------------------------------------------------------------------------- files

def list_data_files(path) -> list[Path]:
    """The data files: `path` itself, or every regular non-hidden file below a folder (sorted;
    hidden files and folders, such as our own cache, are skipped)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in sorted(names) if not n.startswith(".") and (Path(root) / n).is_file()]
    if not files:
        raise DataError(f"{path}: folder holds no data files")
    return files


def read_text_chunks(path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """The text of a UTF-8 file in pieces of about chunk_bytes that end at a line end (a line
    longer than a chunk is cut where it is). DataError on NUL bytes or invalid UTF-8."""
    path = Path(path)
    dec = codecs.getincrementaldecoder("utf-8")(errors="strict")
    carry, offset = "", 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_bytes)
            final = not raw
            nul = raw.find(b"\0")
            if nul >= 0:
                raise DataError(f"{path}: binary file (NUL byte at offset {offset + nul}); "
                                "training data must be UTF-8 text")
            try:
                text = carry + dec.decode(raw, final=final)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text (invalid byte near offset {offset + max(0, e.start)}); "
                                "training data must be UTF-8 text") from None
            offset += len(raw)
            if final:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1
            if cut == 0 and len(text) >= chunk_bytes:
                cut = len(text)
            carry = text[cut:]
            if cut:
                yield text[:cut]


def check_data_files(files: list[Path]) -> int:
    """Read every file once (streaming): DataError for binary / non-UTF-8 files and for data with
    no text at all. Returns the total size in bytes. Empty files inside a folder are allowed."""
    total, has_text = 0, False
    for f in files:
        size = 0
        for chunk in read_text_chunks(f):
            size += len(chunk)
            has_text = has_text or bool(chunk.strip())
        if size == 0 and len(files) == 1:
            raise DataError(f"{f}: empty file")
        total += f.stat().st_size
    if not has_text:
        raise DataError(f"{files[0] if len(files) == 1 else files[0].parent}: data holds no text (only whitespace)")
    return total


def data_key(files: list[Path]) -> str:
    """A hash of the data files' resolved paths, sizes and modification times."""
    h = hashlib.sha256(f"nanoabsorber-data-v{FORMAT_VERSION}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def tokenizer_hash(path) -> str:
    """A hash of a tokenizer: the bytes of tokenizer.json / tokenizer.model and the configs beside
    it (a folder or a file)."""
    path = Path(path)
    if path.is_dir():
        names = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
        files = [path / n for n in names if (path / n).is_file()]
    else:
        files = [path] + [path.parent / n for n in ("tokenizer_config.json", "special_tokens_map.json")
                          if (path.parent / n).is_file() and path.suffix != ".gguf"]
    h = hashlib.sha256()
    for f in files:  # the main file is named by its kind only, so a copy under another name hashes the same
        h.update((f.name if f.name.endswith("_config.json") or f.name.endswith("_map.json") else f.suffix).encode() + b"\0")
        if f.suffix == ".gguf":  # big: identify by size and mtime
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        else:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- cache folder

def is_writable_dir(d: Path) -> bool:
    """A folder we may write into: it has write permission bits (so a read-only data folder is
    honoured even when running as root) and the OS agrees."""
    try:
        mode = d.stat().st_mode
    except OSError:
        return False
    return stat.S_ISDIR(mode) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(d, os.W_OK)


def user_cache_dir() -> Path:
    from .default_model import cache_root

    return cache_root() / "data"


def cache_dir_for(data_path, cache_dir=None) -> Path:
    """Where tokenized data is cached: `cache_dir` if given, else .nanoabsorber-cache/ beside the
    data (in the data folder, or the folder holding the data file) when that is writable, else
    the user cache folder. The folder is created."""
    if cache_dir is not None:
        out = Path(cache_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"{out}: cannot create the cache folder ({e.strerror or e})") from None
        if not is_writable_dir(out):
            raise DataError(f"{out}: cache folder is not writable")
        return out
    data_path = Path(data_path)
    home = data_path if data_path.is_dir() else data_path.parent
    beside = home / CACHE_SUBDIR
    if is_writable_dir(beside) or (not beside.exists() and is_writable_dir(home)):
        try:
            beside.mkdir(exist_ok=True)
            return beside
        except OSError:
            pass
    out = user_cache_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{home} is read-only and {out} cannot be created ({e.strerror or e}); "
                        "pass --cache-dir") from None
    return out


# ----------------------------------------------------------------------------- tokenizer training

SPM_OPTIONS = dict(
    model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
    remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
    allow_whitespace_only_pieces=True, character_coverage=0.9995,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
)


def _spm_sentences(files: list[Path]) -> Iterator[str]:
    for f in files:
        for chunk in read_text_chunks(f):
            for line in chunk.splitlines():
                for i in range(0, len(line), SPM_MAX_CHARS):
                    yield line[i:i + SPM_MAX_CHARS]


def train_sentencepiece(files: list[Path], vocab_size: int, cache_dir: Path, seed: int = 1337,
                        log: Callable[[str], None] = print) -> Path:
    """Train a SentencePiece BPE tokenizer with byte fallback (so no text is unencodable) and an
    identity normalizer on the data; cached in cache_dir by data and options. Returns the path
    of the tokenizer.model."""
    import sentencepiece as spm

    key = hashlib.sha256(json.dumps([data_key(files), vocab_size, seed, SPM_OPTIONS], sort_keys=True).encode())
    out = Path(cache_dir) / f"spm-{key.hexdigest()[:16]}.model"
    if out.is_file():
        log(f"tokenizer: reusing {out}")
        return out
    if vocab_size < MIN_VOCAB:
        raise DataError(f"--vocab-size {vocab_size} is too small: byte fallback alone needs {MIN_VOCAB - 1} pieces "
                        f"(256 bytes + unk/bos/eos); use at least {MIN_VOCAB}")
    log(f"tokenizer: training SentencePiece BPE, vocab {vocab_size}, on {len(files)} file(s)")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_spm_sentences(files), model_writer=model, vocab_size=vocab_size,
            input_sentence_size=SPM_MAX_SENTENCES, shuffle_input_sentence=True,
            num_threads=max(1, min(4, os.cpu_count() or 1)), minloglevel=2, **SPM_OPTIONS)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        if "Vocabulary size" in msg:
            raise DataError(f"--vocab-size {vocab_size} is too large for this data ({msg[msg.index('Vocabulary'):]})") from None
        raise DataError(f"SentencePiece training failed: {msg}") from None
    atomic_write(out, lambda f: f.write(model.getvalue()))
    return out


# ----------------------------------------------------------------------------- tokenizing

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


@dataclass
class TokenFile:
    path: Path
    dtype: np.dtype
    n_tokens: int
    key: str


def tokenize_to_file(files: list[Path], tok, out: Path, chunk_bytes: int = CHUNK_BYTES,
                     log: Callable[[str], None] = print) -> int:
    """Encode the files chunk by chunk and append the ids to `out` (temp file, then rename).
    Returns the number of tokens."""
    dtype = token_dtype(tok.vocab_size)
    bos = tok.bos_id if getattr(tok, "add_bos", False) else None
    eos = tok.eos_id
    n = 0
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        for path in files:
            ids = [bos] if bos is not None else []
            for chunk in read_text_chunks(path, chunk_bytes):
                ids += tok.encode(chunk, allow_special=False)
                np.asarray(ids, dtype=dtype).tofile(f)
                n += len(ids)
                ids = []
            if eos is not None:
                ids.append(eos)
            if ids:
                np.asarray(ids, dtype=dtype).tofile(f)
                n += len(ids)
            log(f"data: tokenized {path.name}: {n:,} tokens so far")
    return n


def prepare_tokens(files: list[Path], tok, tok_hash: str, cache_dir: Path,
                   log: Callable[[str], None] = print, chunk_bytes: int = CHUNK_BYTES) -> TokenFile:
    """The token file for (files, tokenizer), tokenized on the first call and reused after."""
    key = hashlib.sha256(f"{data_key(files)}:{tok_hash}:{tok.vocab_size}".encode()).hexdigest()[:16]
    dtype = token_dtype(tok.vocab_size)
    bin_path = Path(cache_dir) / f"tokens-{key}.{dtype.name}.bin"
    meta_path = bin_path.with_suffix(".json")
    if bin_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            n = int(meta["n_tokens"])
            if bin_path.stat().st_size == n * dtype.itemsize:
                log(f"data: reusing {bin_path} ({n:,} tokens)")
                return TokenFile(bin_path, dtype, n, key)
        except (ValueError, KeyError, OSError):
            pass  # broken cache entry: tokenize again
    log(f"data: tokenizing {len(files)} file(s) into {bin_path}")
    n = tokenize_to_file(files, tok, bin_path, chunk_bytes=chunk_bytes, log=log)
    meta = {"n_tokens": n, "dtype": dtype.name, "vocab_size": tok.vocab_size, "tokenizer": tok_hash,
            "files": [str(f.resolve()) for f in files], "format_version": FORMAT_VERSION}
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return TokenFile(bin_path, dtype, n, key)


# ----------------------------------------------------------------------------- batches

class TokenData:
    """A memory-mapped token file split into train (first part) and validation (last val_frac)."""

    def __init__(self, path, dtype, n_tokens: int, seq_len: int, val_frac: float):
        self.tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
        self.seq_len = T = seq_len
        self.n_val_tokens = int(round(n_tokens * val_frac)) if val_frac > 0 else 0
        self.n_train_tokens = n_tokens - self.n_val_tokens
        self.n_train_windows = max(0, (self.n_train_tokens - 1) // T)
        self.n_val_windows = max(0, (self.n_val_tokens - 1) // T)

    def _windows(self, start: int, windows) -> torch.Tensor:
        T = self.seq_len
        rows = [self.tokens[start + w * T: start + w * T + T + 1] for w in windows]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def batch(self, windows, device="cpu"):
        """Training windows -> (x, y), each (len(windows), seq_len) int64."""
        b = self._windows(0, windows)
        if str(device).startswith("cuda"):
            b = b.pin_memory().to(device, non_blocking=True)
        return b[:, :-1], b[:, 1:]

    def val_batch(self, windows, device="cpu"):
        b = self._windows(self.n_train_tokens, windows).to(device)
        return b[:, :-1], b[:, 1:]

    def val_tokens(self) -> np.ndarray:
        return self.tokens[self.n_train_tokens:]


class WindowLoader:
    """Global batches of training-window indices: each epoch is a permutation fixed by
    (seed, epoch); the position (epoch, pos) is the whole state."""

    def __init__(self, n_windows: int, batch_windows: int, seed: int, epoch: int = 0, pos: int = 0):
        if batch_windows > n_windows:
            raise ValueError("fewer windows than one batch")
        self.n, self.bw, self.seed = n_windows, batch_windows, seed
        self.epoch, self.pos = epoch, pos
        self._perm_epoch, self._perm = None, None

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            self._perm_epoch = self.epoch
        return self._perm

    def next(self) -> np.ndarray:
        if self.pos + self.bw > self.n:  # drop the remainder, start the next epoch
            self.epoch, self.pos = self.epoch + 1, 0
        out = self._permutation()[self.pos:self.pos + self.bw]
        self.pos += self.bw
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n_windows": self.n, "batch_windows": self.bw, "seed": self.seed}


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the tokens' own frequency distribution: the loss of the best unigram
    (context-free) model of exactly these tokens, a baseline a language model must beat."""
    if len(tokens) == 0:
        return math.nan
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


__all__ = ["DataError", "MIN_VOCAB", "list_data_files", "read_text_chunks", "check_data_files", "data_key", "tokenizer_hash",
           "cache_dir_for", "is_writable_dir", "train_sentencepiece", "token_dtype", "TokenFile",
           "tokenize_to_file", "prepare_tokens", "TokenData", "WindowLoader", "unigram_entropy"]
