"""Tokenizers for Llama-family checkpoints: one interface, two families.

1. Byte-level BPE (the GPT-2 lineage: SmolLM2, Llama-3, StarCoder, ...). Text is cut into
   "pretokens" by a chain of regex splits (the `pre_tokenizer` of a HF tokenizer.json, or the
   `tokenizer.ggml.pre` name in a GGUF file), each pretoken's UTF-8 bytes are mapped to printable
   characters with GPT-2's byte<->unicode table, and BPE merges are applied by rank (lowest
   first, as HF's BPE does). Text round-trips exactly when every one of its bytes has a token
   (SmolLM2 lacks 21 rare bytes; see ByteBPETokenizer). `ByteBPETokenizer` is written here from
   scratch; the HF `tokenizers` package is only used by the tests, as the reference. Ids agree
   with HF except on code points that the `regex` package's Unicode database (newer) and HF's
   Oniguruma classify differently: only ones unassigned as of Unicode 14 (tested: none differ
   among the assigned ones).

2. SentencePiece (Llama-1/2, Mistral, TinyLlama): a `tokenizer.model` protobuf, run through the
   `sentencepiece` package. Spaces become "▁", a dummy "▁" is prefixed to the text, and with
   byte_fallback unknown characters become <0xNN> byte pieces. `SentencePieceTokenizer` wraps it.

Both share `Tokenizer`: encode/decode, special-token handling (special tokens in the text are
kept whole when allow_special=True, encoded as plain text when False), ids that stop
generation, and a chat template implemented by hand (ChatML, Llama-2 [INST], Llama-3 headers).
`load_tokenizer(path)` picks the family from a directory or file, and `StreamDecoder` turns a
stream of ids into text pieces that never cut a UTF-8 character in half.
"""
from __future__ import annotations

import heapq
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import regex

from .errors import UserError

__all__ = [
    "TokenizerError",
    "Tokenizer",
    "ByteBPETokenizer",
    "SentencePieceTokenizer",
    "StreamDecoder",
    "load_tokenizer",
    "BPEOptions",
]


class TokenizerError(UserError, ValueError):
    """A tokenizer file could not be used. The message is one line: "<path>: <problem>"."""


class _NotByteLevelError(TokenizerError):
    """A tokenizer.json that is valid but not byte-level BPE (e.g. a SentencePiece export)."""


def _fail(source: Any, problem: str, cls: type[TokenizerError] = TokenizerError) -> TokenizerError:
    one_line = " ".join(str(problem).split())
    return cls(f"{source}: {one_line}")


# --------------------------------------------------------------------------------------------
# GPT-2 byte <-> unicode table
# --------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR: dict[int, str] = _bytes_to_unicode()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_CHAR.items()}
_TO_BYTE_CHARS = str.maketrans({chr(b): c for b, c in BYTE_TO_CHAR.items()})
_FROM_BYTE_CHARS = str.maketrans({c: chr(b) for b, c in BYTE_TO_CHAR.items()})


def _to_byte_chars(text: str) -> str:
    return text.encode("utf-8").decode("latin-1").translate(_TO_BYTE_CHARS)


def _token_bytes(token: str) -> bytes:
    """Bytes of a byte-level vocab entry; entries outside the alphabet are taken as UTF-8 text."""
    if all(c in CHAR_TO_BYTE for c in token):
        return token.translate(_FROM_BYTE_CHARS).encode("latin-1")
    return token.encode("utf-8")


# --------------------------------------------------------------------------------------------
# Pre-tokenizer: the HF tokenizer.json `pre_tokenizer` section as a chain of split steps
# --------------------------------------------------------------------------------------------

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}
_LLAMA3_SPLIT = {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False}

# GGUF `tokenizer.ggml.pre` name -> (tokenizer.json pre_tokenizer, ignore_merges)
GGUF_PRE_TOKENIZERS: dict[str, tuple[dict, bool]] = {
    "default": (_BYTE_LEVEL, False),
    "gpt-2": (_BYTE_LEVEL, False),
    "gpt2": (_BYTE_LEVEL, False),
    "smollm": ({"type": "Sequence", "pretokenizers": [_DIGITS, _BYTE_LEVEL]}, False),
    "starcoder": ({"type": "Sequence", "pretokenizers": [_DIGITS, _BYTE_LEVEL]}, False),
    "refact": ({"type": "Sequence", "pretokenizers": [_DIGITS, _BYTE_LEVEL]}, False),
    "llama-bpe": ({"type": "Sequence", "pretokenizers": [_LLAMA3_SPLIT, dict(_BYTE_LEVEL, use_regex=False)]}, True),
    "llama3": ({"type": "Sequence", "pretokenizers": [_LLAMA3_SPLIT, dict(_BYTE_LEVEL, use_regex=False)]}, True),
}

PreStep = Callable[[str], list[str]]


def _segments(text: str, pattern: regex.Pattern) -> list[tuple[str, bool]]:
    """Cut text into (piece, is_match) segments covering all of it; empty matches are ignored."""
    segs, last = [], 0
    for m in pattern.finditer(text):
        start, end = m.span()
        if start == end:
            continue
        if start > last:
            segs.append((text[last:start], False))
        segs.append((text[start:end], True))
        last = end
    if last < len(text):
        segs.append((text[last:], False))
    return segs


def _fold(segs: list[tuple[str, bool]], merge: Callable[[bool, bool], bool], prepend: bool = False) -> list[str]:
    """Join a segment onto the previous output piece when merge(is_match, previous_is_match)."""
    out: list[str] = []
    prev = False
    for piece, is_match in segs:
        if out and merge(is_match, prev):
            out[-1] = piece + out[-1] if prepend else out[-1] + piece
        else:
            out.append(piece)
        prev = is_match
    return out


def split_by_behavior(text: str, pattern: regex.Pattern, behavior: str) -> list[str]:
    """HF `Split` semantics for the five SplitDelimiterBehavior values."""
    segs = _segments(text, pattern)
    if behavior == "Isolated":
        return [s for s, _ in segs]
    if behavior == "Removed":
        return [s for s, is_match in segs if not is_match]
    if behavior == "MergedWithPrevious":
        return _fold(segs, lambda m, prev: m and not prev)
    if behavior == "MergedWithNext":
        return _fold(segs[::-1], lambda m, prev: m and not prev, prepend=True)[::-1]
    if behavior == "Contiguous":
        return _fold(segs, lambda m, prev: m == prev)
    raise ValueError(f"unsupported Split behavior {behavior!r}")


def _split_step(cfg: dict) -> PreStep:
    pat = cfg.get("pattern") or {}
    if "Regex" in pat:
        compiled = regex.compile(pat["Regex"])
    elif "String" in pat:
        compiled = regex.compile(regex.escape(pat["String"]))
    else:
        raise ValueError(f"Split pattern must be Regex or String, got {pat!r}")
    if cfg.get("invert"):
        raise ValueError("Split with invert=true is not supported")
    behavior = cfg.get("behavior", "Isolated")
    split_by_behavior("", compiled, behavior)  # validates the behavior name now
    return lambda piece: split_by_behavior(piece, compiled, behavior)


def _digits_step(cfg: dict) -> PreStep:
    compiled = regex.compile(r"\p{N}" if cfg.get("individual_digits") else r"\p{N}+")
    return lambda piece: split_by_behavior(piece, compiled, "Isolated")


_GPT2_RE = regex.compile(GPT2_PATTERN)


def _byte_level_step(cfg: dict) -> PreStep:
    prefix_space, use_regex = bool(cfg.get("add_prefix_space")), cfg.get("use_regex", True)

    def step(piece: str) -> list[str]:
        if prefix_space and not piece.startswith(" "):
            piece = " " + piece
        parts = _GPT2_RE.findall(piece) if use_regex else [piece]
        return [_to_byte_chars(p) for p in parts]

    return step


_STEP_BUILDERS: dict[str, Callable[[dict], PreStep]] = {
    "Split": _split_step,
    "Digits": _digits_step,
    "ByteLevel": _byte_level_step,
}


def _flatten_pre(cfg: dict | None) -> list[dict]:
    if cfg is None:
        return []
    if cfg.get("type") == "Sequence":
        return [leaf for sub in cfg.get("pretokenizers", []) for leaf in _flatten_pre(sub)]
    return [cfg]


def build_pre_tokenizer(cfg: dict | None) -> list[PreStep]:
    """Turn a tokenizer.json pre_tokenizer section into split steps; ValueError if unsupported."""
    leaves = _flatten_pre(cfg)
    if not any(leaf.get("type") == "ByteLevel" for leaf in leaves):
        raise ValueError("pre_tokenizer has no ByteLevel step, so this is not byte-level BPE")
    steps = []
    for leaf in leaves:
        builder = _STEP_BUILDERS.get(leaf.get("type"))
        if builder is None:
            raise ValueError(f"unsupported pre_tokenizer type {leaf.get('type')!r}")
        steps.append(builder(leaf))
    return steps


def pre_tokenize(text: str, steps: list[PreStep]) -> list[str]:
    pieces = [text]
    for step in steps:
        pieces = [out for piece in pieces for out in step(piece) if out]
    return pieces


# --------------------------------------------------------------------------------------------
# Chat templates, implemented by hand (no jinja)
# --------------------------------------------------------------------------------------------

_CHATML_DEFAULT_SYSTEM_RE = regex.compile(r"'<\|im_start\|>system(?:\n|\\n)([^'+]*?)<\|im_end\|>(?:\n|\\n)'")


def chatml_default_system(template: str | None) -> str | None:
    """The constant system prompt a ChatML jinja template inserts when there is none (SmolLM2)."""
    if not template:
        return None
    m = _CHATML_DEFAULT_SYSTEM_RE.search(template)
    return m.group(1).replace("\\n", "\n") if m else None


def _check_messages(messages: list[dict]) -> None:
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"each message must be a dict with str 'role' and 'content', got {m!r}")


def render_chatml(messages: list[dict], add_generation_prompt: bool, default_system: str | None) -> str:
    out = []
    if messages and messages[0]["role"] != "system" and default_system is not None:
        out.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def render_llama2(messages: list[dict], bos: str, eos: str) -> str:
    """Meta's Llama-2 chat format (as the HF Llama-2-chat template renders it). The prompt always
    ends with "[/INST]", so add_generation_prompt has nothing to add."""
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out = []
    for i, m in enumerate(messages):
        if (m["role"] == "user") != (i % 2 == 0):
            raise ValueError("Llama-2 chat roles must alternate user/assistant/user/...")
        content = m["content"]
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            out.append(f"{bos}[INST] {content.strip()} [/INST]")
        else:
            out.append(f" {content.strip()} {eos}")
    return "".join(out)


def render_llama3(messages: list[dict], add_generation_prompt: bool) -> str:
    out = ["<|begin_of_text|>"]
    out += [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages]
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------

class Tokenizer:
    """Common interface. Subclasses provide _encode_plain (text without special tokens),
    _decode_plain (ids without special tokens) and the attributes set in _init_common."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    special_tokens: dict[str, int]
    stop_ids: set[int]
    add_bos: bool
    chat_template: str | None
    chat_format: str | None  # "chatml" | "llama2" | "llama3" | None
    source: str
    default_chat_format: str | None = None

    def _init_common(self, *, source: str, vocab_size: int, special_tokens: dict[str, int],
                     always_split: Iterable[str] = (), bos_id: int | None = None,
                     eos_id: int | None = None, pad_id: int | None = None, add_bos: bool = False,
                     chat_template: str | None = None) -> None:
        self.source = str(source)
        self.vocab_size = vocab_size
        self.special_tokens = dict(special_tokens)
        self.bos_id, self.eos_id, self.pad_id, self.add_bos = bos_id, eos_id, pad_id, add_bos
        self.chat_template = chat_template
        self._id_to_special = {i: t for t, i in self.special_tokens.items()}
        self._special_re = self._alternation(self.special_tokens)
        self._always_re = self._alternation(always_split)  # added tokens that are not special
        self.refresh()

    @staticmethod
    def _alternation(tokens: Iterable[str]) -> regex.Pattern | None:
        # longest first, so that at one position the longest token wins (HF: leftmost-longest)
        alts = sorted(tokens, key=len, reverse=True)
        return regex.compile("|".join(regex.escape(t) for t in alts)) if alts else None

    def refresh(self) -> None:
        """Recompute stop_ids and the chat format after bos/eos/chat_template changed."""
        self.stop_ids = {self.eos_id} if self.eos_id is not None else set()
        self.stop_ids |= {self.special_tokens[t] for t in _END_OF_TURN if t in self.special_tokens}
        self.chat_format = self._detect_chat_format()

    def _detect_chat_format(self) -> str | None:
        """From the jinja template text if there is one, else from the special tokens."""
        markers = {"<|im_start|>": "chatml", "<|start_header_id|>": "llama3", "[INST]": "llama2"}
        for marker, fmt in markers.items():
            if self.chat_template and marker in self.chat_template:
                return fmt
        if self.chat_template:
            return None
        for marker, fmt in markers.items():
            if marker in self.special_tokens:
                return fmt
        return self.default_chat_format

    def token_to_id(self, token: str) -> int | None:
        return self.special_tokens.get(token)

    # ---- encode / decode ----------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = True) -> list[int]:
        """Ids of text. Special tokens written in the text become their ids when allow_special,
        else they are encoded as the plain text they are."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = [self._required_id("bos")] if bos else []
        for chunk, special_id in self._split_special(text, allow_special):
            if special_id is not None:
                ids.append(special_id)
            else:
                ids.extend(self._encode_plain(chunk))
        if eos:
            ids.append(self._required_id("eos"))
        return ids

    def decode(self, ids: Any) -> str:
        """Text of ids (list[int] or a 1-D tensor); special tokens appear as their text and a
        trailing partial UTF-8 sequence as U+FFFD."""
        ids = _as_id_list(ids)
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"{self.source}: token id {i} out of range [0, {self.vocab_size})")
        return self._decode_ids(ids)

    def _decode_ids(self, ids: list[int]) -> str:
        out, run = [], []
        for i in ids:
            if i in self._id_to_special:
                out.append(self._decode_plain(run))
                out.append(self._id_to_special[i])
                run = []
            else:
                run.append(i)
        out.append(self._decode_plain(run))
        return "".join(out)

    def _required_id(self, which: str) -> int:
        value = getattr(self, f"{which}_id")
        if value is None:
            raise _fail(self.source, f"this tokenizer has no {which.upper()} token")
        return value

    def _split_special(self, text: str, allow_special: bool) -> Iterator[tuple[str, int | None]]:
        pattern = self._special_re if allow_special else self._always_re
        if pattern is None:
            if text:
                yield text, None
            return
        last = 0
        for m in pattern.finditer(text):
            if m.start() > last:
                yield text[last:m.start()], None
            yield m.group(), self.special_tokens[m.group()]
            last = m.end()
        if last < len(text):
            yield text[last:], None

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_plain(self, ids: list[int]) -> str:
        raise NotImplementedError

    # ---- chat ---------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation [{"role": ..., "content": ...}, ...]; encode it
        with allow_special=True."""
        _check_messages(messages)
        if self.chat_format == "chatml":
            return render_chatml(messages, add_generation_prompt, chatml_default_system(self.chat_template))
        if self.chat_format == "llama3":
            return render_llama3(messages, add_generation_prompt)
        if self.chat_format == "llama2":
            bos = self._id_to_special.get(self.bos_id, "") if self.bos_id is not None else ""
            eos = self._id_to_special.get(self.eos_id, "") if self.eos_id is not None else ""
            return render_llama2(messages, bos, eos)
        raise _fail(self.source, "no known chat format (ChatML, Llama-2 or Llama-3) for this tokenizer")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, chat_format={self.chat_format!r})")


def _as_id_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


# --------------------------------------------------------------------------------------------
# Byte-level BPE
# --------------------------------------------------------------------------------------------

_CACHE_LIMIT = 200_000


@dataclass
class BPEOptions:
    """The less common tokenizer.json settings, kept so that save_tokenizer_json writes them back."""

    ignore_merges: bool = False  # a pretoken that is a whole vocab entry is taken as is (Llama-3)
    unk_token: str | None = None  # stands for characters with no token; None: they are dropped
    fuse_unk: bool = False
    decoder: dict = field(default_factory=lambda: {"type": "ByteLevel", "add_prefix_space": True,
                                                   "trim_offsets": True, "use_regex": True})
    post_processor: dict | None = field(default_factory=lambda: {"type": "ByteLevel", "add_prefix_space": True,
                                                                 "trim_offsets": False, "use_regex": True})


class ByteBPETokenizer(Tokenizer):
    """GPT-2 style byte-level BPE. Build it with from_tokenizer_json or from_gguf.

    decode(encode(s)) == s for any text whose UTF-8 bytes all have a token. A vocab may lack some
    bytes (`missing_bytes`; SmolLM2 has no token for 0x04 0x06 0x13 0x14 0x16 0x1D, nor for lead
    bytes 0xF1 0xF2 of the unassigned planes 4-11, nor for bytes that never occur in UTF-8); such
    bytes are dropped by encode, exactly as HF tokenizers does when the model has no unk_token."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], added_tokens: list[dict],
                 pre_tokenizer: dict, *, options: BPEOptions | None = None, bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None, add_bos: bool = False,
                 chat_template: str | None = None, source: str = "<memory>") -> None:
        try:
            self._steps = build_pre_tokenizer(pre_tokenizer)
        except (ValueError, regex.error) as e:
            raise _fail(source, str(e))
        self._vocab = dict(vocab)
        self._merges = list(merges)
        _check_vocab(self._vocab, self._merges, source)
        self._ranks = {pair: rank for rank, pair in reversed(list(enumerate(self._merges)))}
        self._added = [dict(t) for t in added_tokens]
        self._pre_cfg, self.options = pre_tokenizer, options or BPEOptions()
        if self.options.unk_token is not None and self.options.unk_token not in self._vocab:
            raise _fail(source, f"unk_token {self.options.unk_token!r} is not in the vocab")
        self._cache: dict[str, list[int]] = {}
        added = {t["content"]: int(t["id"]) for t in self._added}
        size = max([*self._vocab.values(), *added.values(), -1]) + 1
        self._id_bytes = self._build_id_bytes(size, added)
        # bytes with no token: text containing them loses them (as in HF); SmolLM2 lacks 21
        self.missing_bytes = frozenset(b for b, c in BYTE_TO_CHAR.items() if c not in self._vocab)
        self._init_common(source=source, vocab_size=size, special_tokens=added,
                          always_split=[t["content"] for t in self._added if not t.get("special")],
                          bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, add_bos=add_bos,
                          chat_template=chat_template)

    def _build_id_bytes(self, size: int, added: dict[str, int]) -> list[bytes]:
        out = [b""] * size
        for token, i in self._vocab.items():
            out[i] = _token_bytes(token)
        for token, i in added.items():
            out[i] = token.encode("utf-8")
        return out

    def token_to_id(self, token: str) -> int | None:
        return self.special_tokens.get(token, self._vocab.get(token))

    # ---- constructors -------------------------------------------------------------------

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike) -> "ByteBPETokenizer":
        """A HF tokenizers `tokenizer.json` whose model is byte-level BPE."""
        data = _read_json(path)
        model = data.get("model")
        if not isinstance(model, dict):
            raise _fail(path, "no 'model' section (not a HF tokenizer.json)")
        if model.get("type", "BPE") != "BPE":
            raise _fail(path, f"model type {model.get('type')!r} is not BPE", _NotByteLevelError)
        if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
            raise _fail(path, "model has no 'vocab' dict or no 'merges' list")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key) not in (None, 0, 0.0):
                raise _fail(path, f"unsupported BPE option {key}={model[key]!r}")
        if data.get("normalizer") is not None:
            raise _fail(path, f"unsupported normalizer {data['normalizer'].get('type')!r}", _NotByteLevelError)
        if not any(leaf.get("type") == "ByteLevel" for leaf in _flatten_pre(data.get("pre_tokenizer"))):
            raise _fail(path, "pre_tokenizer has no ByteLevel step: not byte-level BPE", _NotByteLevelError)
        added = data.get("added_tokens") or []
        for t in added:
            if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
                raise _fail(path, f"added token {t.get('content')!r} uses lstrip/rstrip/single_word (unsupported)")
        try:
            merges = [_parse_merge(m) for m in model["merges"]]
        except ValueError as e:
            raise _fail(path, str(e))
        options = BPEOptions(ignore_merges=bool(model.get("ignore_merges")), unk_token=model.get("unk_token"),
                             fuse_unk=bool(model.get("fuse_unk")), post_processor=data.get("post_processor"))
        if data.get("decoder") is not None:
            options.decoder = data["decoder"]
        return cls(model["vocab"], merges, added, data.get("pre_tokenizer"), options=options,
                   add_bos=_template_adds_bos(data.get("post_processor")), source=str(path))

    @classmethod
    def from_gguf(cls, path_or_reader: Any) -> "ByteBPETokenizer":
        """The tokenizer embedded in a GGUF file (tokenizer.ggml.model == "gpt2")."""
        reader, source = _open_gguf(path_or_reader)
        get = _gguf_getter(reader)
        kind = get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise _fail(source, f"tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) is supported")
        tokens, merges = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise _fail(source, "missing tokenizer.ggml.tokens or tokenizer.ggml.merges")
        types = get("tokenizer.ggml.token_type") or [1] * len(tokens)
        pre_name = get("tokenizer.ggml.pre") or "default"
        if pre_name not in GGUF_PRE_TOKENIZERS:
            raise _fail(source, f"unsupported tokenizer.ggml.pre {pre_name!r} (known: {', '.join(GGUF_PRE_TOKENIZERS)})")
        pre_cfg, ignore_merges = GGUF_PRE_TOKENIZERS[pre_name]
        added = [_added_token(i, tok, special=(t == 3)) for i, (tok, t) in enumerate(zip(tokens, types)) if t in (3, 4)]
        try:
            parsed_merges = [_parse_merge(m) for m in merges]
        except ValueError as e:
            raise _fail(source, str(e))
        return cls({tok: i for i, tok in enumerate(tokens)}, parsed_merges, added, pre_cfg,
                   options=BPEOptions(ignore_merges=ignore_merges), bos_id=get("tokenizer.ggml.bos_token_id"),
                   eos_id=get("tokenizer.ggml.eos_token_id"), pad_id=get("tokenizer.ggml.padding_token_id"),
                   add_bos=bool(get("tokenizer.ggml.add_bos_token") or False),
                   chat_template=get("tokenizer.chat_template"), source=source)

    # ---- saving -------------------------------------------------------------------------

    def to_tokenizer_json(self) -> dict:
        """The HF tokenizer.json document for this tokenizer."""
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [_added_token(t["id"], t["content"], bool(t.get("special")), t.get("normalized", False))
                             for t in sorted(self._added, key=lambda t: t["id"])],
            "normalizer": None,
            "pre_tokenizer": self._pre_cfg,
            "post_processor": self.options.post_processor,
            "decoder": self.options.decoder,
            "model": {
                "type": "BPE", "dropout": None, "unk_token": self.options.unk_token,
                "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": self.options.fuse_unk,
                "byte_fallback": False, "ignore_merges": self.options.ignore_merges,
                "vocab": dict(sorted(self._vocab.items(), key=lambda kv: kv[1])),
                "merges": [f"{a} {b}" for a, b in self._merges],
            },
        }

    def save_tokenizer_json(self, path: str | os.PathLike) -> None:
        """Write a HF tokenizer.json (atomically: a temp file in the same folder, then os.replace)."""
        from .io import atomic_write

        atomic_write(path, lambda f: json.dump(self.to_tokenizer_json(), f, ensure_ascii=False, indent=1), "w")

    # ---- encode / decode ----------------------------------------------------------------

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for piece in pre_tokenize(text, self._steps):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = self._bpe_ids(piece)
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[piece] = piece_ids
            ids.extend(piece_ids)
        return ids

    def _bpe_ids(self, piece: str) -> list[int]:
        vocab = self._vocab
        if self.options.ignore_merges and piece in vocab:
            return [vocab[piece]]
        return [vocab[s] for s in self._merge(self._symbols(piece))]

    def _symbols(self, piece: str) -> list[str]:
        """The starting symbols: one per byte-char; a byte with no token becomes unk_token (one
        per run of them with fuse_unk) or, without unk_token, is dropped, as HF does."""
        vocab, unk, fuse = self._vocab, self.options.unk_token, self.options.fuse_unk
        syms: list[str] = []
        prev_unk = False
        for c in piece:
            if c in vocab:
                syms.append(c)
                prev_unk = False
            elif unk is not None:
                if not (fuse and prev_unk):
                    syms.append(unk)
                prev_unk = True
        return syms

    def _merge(self, syms: list[str]) -> list[str]:
        """Apply merges lowest rank first, leftmost first among equals (HF's priority-queue BPE)."""
        n = len(syms)
        if n < 2:
            return syms
        ranks = self._ranks
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n

        def entry(i: int) -> tuple[int, int, str, str] | None:
            j = nxt[i]
            rank = ranks.get((syms[i], syms[j])) if j < n else None
            return None if rank is None else (rank, i, syms[i], syms[j])

        heap = [e for e in map(entry, range(n - 1)) if e is not None]
        heapq.heapify(heap)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j >= n or syms[i] != a or syms[j] != b:
                continue  # stale entry: one side was merged since
            syms[i], alive[j] = a + b, False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            for k in (prv[i], i):
                e = entry(k) if k >= 0 else None
                if e is not None:
                    heapq.heappush(heap, e)
        return [s for s, keep in zip(syms, alive) if keep]

    def _decode_ids(self, ids: list[int]) -> str:  # special tokens' bytes are their text
        return b"".join(self._id_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def id_to_bytes(self, i: int) -> bytes:
        return self._id_bytes[i]


def _check_vocab(vocab: dict[str, int], merges: list[tuple[str, str]], source: str) -> None:
    bad_id = next((t for t, i in vocab.items() if not isinstance(i, int) or i < 0), None)
    if bad_id is not None:
        raise _fail(source, f"vocab entry {bad_id!r} has id {vocab[bad_id]!r}, not a non-negative int")
    bad_merge = next(((a, b) for a, b in merges if a + b not in vocab or a not in vocab or b not in vocab), None)
    if bad_merge is not None:
        raise _fail(source, f"merge {' '.join(bad_merge)!r} uses or makes a token that is not in the vocab")


def _parse_merge(m: Any) -> tuple[str, str]:
    if isinstance(m, str):
        parts = m.split(" ")
    elif isinstance(m, (list, tuple)):
        parts = list(m)
    else:
        parts = []
    if len(parts) != 2 or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"bad merge entry {m!r}")
    return parts[0], parts[1]


def _added_token(i: int, content: str, special: bool, normalized: bool = False) -> dict:
    return {"id": int(i), "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": bool(normalized), "special": special}


def _template_adds_bos(post: dict | None) -> bool:
    """True when a TemplateProcessing post_processor puts a special token before $A (Llama-3)."""
    if not post:
        return False
    if post.get("type") == "Sequence":
        return any(_template_adds_bos(p) for p in post.get("processors", []))
    single = post.get("single") if post.get("type") == "TemplateProcessing" else None
    return bool(single) and "SpecialToken" in single[0]


def _open_gguf(path_or_reader: Any) -> tuple[Any, str]:
    if hasattr(path_or_reader, "fields"):
        return path_or_reader, str(getattr(getattr(path_or_reader, "data", None), "filename", "<GGUFReader>"))
    import gguf

    source = str(path_or_reader)
    if not Path(source).is_file():
        raise _fail(source, "no such file")
    try:
        return gguf.GGUFReader(source), source
    except Exception as e:  # the reader raises ValueError, struct errors, ... on a bad file
        raise _fail(source, f"not a readable GGUF file ({type(e).__name__}: {e})")


def _gguf_getter(reader: Any) -> Callable[[str], Any]:
    def get(name: str) -> Any:
        f = reader.fields.get(name)
        if f is None:
            return None
        value = f.contents()
        return value.tolist() if hasattr(value, "tolist") else value

    return get


# --------------------------------------------------------------------------------------------
# SentencePiece
# --------------------------------------------------------------------------------------------

class SentencePieceTokenizer(Tokenizer):
    """A `tokenizer.model` run by the sentencepiece package (Llama-2 conventions: BOS first).

    Round trips: with an identity normalizer and byte_fallback, decode(encode(s)) == s for most
    text, including leading spaces (SP strips exactly the dummy prefix it added). It cannot
    round-trip "▁" (U+2581, SP's own space marker, which decodes as " "), nor, with a NFKC
    normalizer, text that normalization changes. Each chunk between special tokens is encoded
    separately and so gets its own dummy prefix, as Meta's and HF's (legacy) Llama-2 do.
    User-defined pieces are always matched by sentencepiece itself, even with allow_special=False.
    """

    default_chat_format = "llama2"

    def __init__(self, path: str | os.PathLike) -> None:
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise _fail(path, "no such file")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with multi-line text
            raise _fail(path, f"not a valid SentencePiece model ({type(e).__name__}: {e})")
        sp = self._sp
        special = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}

        def opt(i: int) -> int | None:
            return i if i >= 0 else None

        self._init_common(source=str(path), vocab_size=sp.get_piece_size(), special_tokens=special,
                          bos_id=opt(sp.bos_id()), eos_id=opt(sp.eos_id()), pad_id=opt(sp.pad_id()), add_bos=True)

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def _encode_plain(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def _decode_plain(self, ids: list[int]) -> str:
        return self._sp.decode(ids) if ids else ""


# --------------------------------------------------------------------------------------------
# Streaming decode
# --------------------------------------------------------------------------------------------

class StreamDecoder:
    """Turns ids, pushed one at a time, into the text they add. A UTF-8 character split over
    several tokens is held back until it is complete (so printing never shows a broken
    character); if a window of _MAX_PENDING tokens still ends badly it is emitted as it is.

    Works for both families: it decodes a small window of recent ids and emits the difference,
    which also keeps SentencePiece's leading-space handling right."""

    _MAX_PENDING = 8

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self._prefix = 0  # window start: ids before it are fully emitted context
        self._read = 0  # ids before this have been emitted

    def push(self, id: int) -> str:
        self.ids.append(int(id))
        prefix_text = self.tok.decode(self.ids[self._prefix:self._read])
        new_text = self.tok.decode(self.ids[self._prefix:])
        complete = not new_text.endswith("\ufffd")
        if len(new_text) > len(prefix_text) and (complete or len(self.ids) - self._read >= self._MAX_PENDING):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the end)."""
        prefix_text = self.tok.decode(self.ids[self._prefix:self._read])
        new_text = self.tok.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):]


# --------------------------------------------------------------------------------------------
# Loading from a folder or file
# --------------------------------------------------------------------------------------------

def _read_json(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise _fail(path, "no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"not valid JSON ({e})")
    if not isinstance(data, dict):
        raise _fail(path, "not a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value: Any) -> str | None:
    if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _apply_config(tok: Tokenizer, folder: Path) -> None:
    """Take bos/eos/pad/add_bos/chat_template from special_tokens_map.json and
    tokenizer_config.json beside the tokenizer file (the latter wins)."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        cfg = _read_json(path)
        for which in ("bos", "eos", "pad"):
            content = _token_content(cfg.get(f"{which}_token"))
            if content is not None and tok.token_to_id(content) is not None:
                setattr(tok, f"{which}_id", tok.token_to_id(content))
        if isinstance(cfg.get("add_bos_token"), bool):
            tok.add_bos = cfg["add_bos_token"]
        template = _pick_template(cfg.get("chat_template"))
        if template is not None:
            tok.chat_template = template
    _fill_chat_defaults(tok)
    tok.refresh()


def _fill_chat_defaults(tok: Tokenizer) -> None:
    """A bare byte-level tokenizer.json has no bos/eos: use the ChatML/Llama-3 convention."""
    if tok.bos_id is None and tok.eos_id is None and isinstance(tok, ByteBPETokenizer):
        for bos, eos in (("<|im_start|>", "<|im_end|>"), ("<|begin_of_text|>", "<|end_of_text|>"),
                         ("<|endoftext|>", "<|endoftext|>")):
            if bos in tok.special_tokens and eos in tok.special_tokens:
                tok.bos_id, tok.eos_id = tok.special_tokens[bos], tok.special_tokens[eos]
                break


def _resolve(path: Path) -> Path:
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return path / name
        raise _fail(path, "directory has no tokenizer.json or tokenizer.model")
    if not path.exists():
        raise _fail(path, "no such file or directory")
    return path


def _load_file(path: Path) -> Tokenizer:
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            return ByteBPETokenizer.from_tokenizer_json(path)
        except _NotByteLevelError:
            sp_model = path.with_name("tokenizer.model")
            if sp_model.is_file():  # Llama-2 repos ship a Metaspace tokenizer.json next to the .model
                return SentencePieceTokenizer(sp_model)
            raise
    if suffix == ".model":
        return SentencePieceTokenizer(path)
    if suffix == ".gguf":
        return ByteBPETokenizer.from_gguf(path)
    raise _fail(path, "unknown tokenizer file type (expected tokenizer.json, tokenizer.model or .gguf)")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a folder (tokenizer.json preferred over tokenizer.model) or a file.
    tokenizer_config.json / special_tokens_map.json beside it set bos/eos/pad/chat_template."""
    file = _resolve(Path(path))
    tok = _load_file(file)
    _apply_config(tok, file.parent)
    return tok
