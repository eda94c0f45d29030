"""Chat with constant memory: a verbatim window of recent turns plus a LoRA that holds what
scrolled out of it (chat.py, bench/bench_chat.py).

    session = ChatSession(model, tok, ChatConfig(window=256), chat_recipe())
    text = session.answer("My dog is called Biscuit.", on_token=print)   # appends the exchange
    session.maybe_absorb(log)          # the oldest turns -> LoRA when the window overflows

Absorbing turns is Algorithm 1 (absorber.absorb_chunk, no second copy) on one group:
    P = the chat header (system message), X = the oldest turns rendered in the chat template,
    Y = the turns that follow them (at most cfg.sync_len tokens) followed by chat probes about the
        absorbed turns (cfg.probes; the default recite: "Repeat the text above word for word."
        answered by the absorbed turns as plain "User: ... / Assistant: ..." text).
The teacher is the current model (LoRA included: earlier memory) with the history in its window;
the student the same model without X. After absorbing, the verbatim window holds at most
ChatConfig.keep x window tokens, so absorptions come every (1 - keep) x window tokens of talk.

A memory folder (`MemoryDir`) holds, each written atomically (nanoabsorber.io):
    config.json        base-model fingerprint, LoRA layout, window, system prompt (a folder made
                       with another base model or settings is refused)
    state.safetensors  the LoRA tensors + (in its metadata) the verbatim window and the counters:
                       one file, so adapter and window always belong together
    transcript.jsonl   every exchange and command (trimmed on load to what the state has seen)
    lock               fcntl.flock'd while a chat.py uses the folder (released on exit)
A kill at any moment leaves the last state.safetensors that was completely written.
"""
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .absorber import AbsorbConfig, absorb_chunk, probe_kinds
from .config import folder_or_new, in_range, non_negative, positive, setting, validate
from .errors import UserError
from .io import atomic_save_safetensors, atomic_write_text

# The per-absorption recipe of a chat (the rest is AbsorbConfig's): one absorption must take
# well under a minute on 2 CPU cores (README, "Chat with memory"), so few steps, and Y's real
# following turns are capped at 256 tokens. Probes: recite (the passage probes of documents need
# names to hang facts on; a chat's turns are probed as a whole); every Y token at every step; the
# teacher is the model with its memory (measured so: README, "Chat with memory"); the loss is the
# chat-probe recipe's (hybrid: with hidden-state L1 the memory ranked facts first but rarely said them).
CHAT_RECIPE = {"steps": 24, "sync_len": 256, "probes": "recite", "batch_tokens": 0, "teacher": "updated"}
# AbsorbConfig settings a chat does not use (X is whole turns, Y is never generated); chat.py has
# no flags for them (and --temperature is the answers' sampling temperature).
CHAT_SKIP = ("chunk", "gen_tokens", "gen_temperature", "gen_top_p", "gen_samples", "temperature")
# The automatic --window: a quarter of the model's context, at most 512 tokens. Not the context
# size but the cost decides: one absorption takes X = (1 - keep) x window tokens and Y = up to
# sync_len following tokens + the recite probe (about X again), so its time grows with the window
# (measured, 24 steps, 1 thread on a shared 2-core machine: window 256 -> ~40 s, 512 -> ~75 s;
# 1024 would be ~2.5 min). 512 keeps several exchanges verbatim and an absorption near a minute.
WINDOW_MAX = 512
STATE_VERSION = 1


def chat_recipe(**over) -> AbsorbConfig:
    """AbsorbConfig with the chat's per-absorption defaults (CHAT_RECIPE), then `over`."""
    return AbsorbConfig(**{**CHAT_RECIPE, **over})


def _readable_file(v: str):
    return None if Path(v).is_file() else ("is a folder" if Path(v).is_dir() else "no such file")


@dataclass
class ChatConfig:
    """chat.py's own settings (the absorption recipe is AbsorbConfig, the model RunConfig)."""
    window: Optional[int] = setting(None, f"tokens of conversation kept verbatim in the prompt (automatic: a quarter "
                                          f"of the model's context, at most {WINDOW_MAX})", check=positive)
    keep: float = setting(0.5, "after an absorption the verbatim window holds at most this fraction of --window "
                               "(the rest is absorbed at once: fewer, larger absorptions)", check=in_range(0.0, 0.9))
    memory: Optional[str] = setting(None, "folder for the persistent memory (adapter, window, transcript); "
                                          "reopen it to continue (automatic: none, memory lasts one session)",
                                    check=folder_or_new)
    adapter: Optional[str] = setting(None, "start from this absorbed-document adapter (.safetensors from absorb.py)",
                                     check=_readable_file)
    script: Optional[str] = setting(None, 'run without a terminal: JSON lines of {"user": "..."} or '
                                          '{"command": "/remember"}; answers go out as JSON lines',
                                    check=_readable_file)
    out: Optional[str] = setting(None, "with --script: write the answers here instead of stdout")
    system: Optional[str] = setting(None, "system prompt (automatic: the model's default)")
    max_tokens: int = setting(256, "answer tokens at most", check=positive)
    temperature: float = setting(0.0, "answer sampling temperature (0 = greedy)", check=non_negative)
    top_p: Optional[float] = setting(None, "answer nucleus threshold in (0, 1]", check=in_range(1e-6, 1.0))

    def __post_init__(self):
        validate(self)


# ----------------------------------------------------------------------------- rendering

def check_chat_tokenizer(tok) -> None:
    if tok.chat_format not in ("chatml", "llama3"):
        raise UserError(f"{tok.source}: chat.py needs a ChatML or Llama-3 chat template "
                        f"(this tokenizer's: {tok.chat_format or 'none'})")


def _system(system: Optional[str]) -> list:
    return [{"role": "system", "content": system}] if system else []


def render(tok, system: Optional[str], turns: list, gen: bool = False) -> str:
    """The chat-template text of a conversation (system prompt, automatic when None)."""
    return tok.apply_chat_template(_system(system) + list(turns), add_generation_prompt=gen)


def header(tok, system: Optional[str]) -> str:
    """The chat template's text before the first turn (the system message)."""
    probe = render(tok, system, [{"role": "user", "content": "\x00"}])
    return probe.split("\x00")[0].rsplit(render_turn_start(tok), 1)[0]


def render_turn_start(tok) -> str:
    """The text a user turn starts with, found by rendering (ChatML: '<|im_start|>user\\n')."""
    a = tok.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "\x00"}], False)
    b = tok.apply_chat_template([{"role": "system", "content": "s"}], False)
    return a[len(b):].split("\x00")[0]


def segment(tok, system: Optional[str], before: list, turns: list) -> str:
    """The text `turns` add after the conversation `before` (both rendered in the template)."""
    a, b = render(tok, system, before), render(tok, system, before + turns)
    if not b.startswith(a):
        raise UserError(f"{tok.source}: this chat template does not render turns one after another")
    if not before:
        h = header(tok, system)
        return b[len(h):]
    return b[len(a):]


def plain(turns: list) -> str:
    """The turns as plain text (the answer of the recite probe)."""
    return "\n".join(f"{m['role'].capitalize()}: {m['content'].strip()}" for m in turns)


def exchanges(turns: list) -> list:
    """Split turns into exchanges (a user turn and the answers after it)."""
    out = []
    for m in turns:
        if m["role"] == "user" or not out:
            out.append([])
        out[-1].append(m)
    return out


# ----------------------------------------------------------------------------- absorbing turns

def absorb_groups(tok, system: Optional[str], old: list, following: list, cfg: AbsorbConfig) -> list:
    """absorb_chunk's groups for absorbing the turns `old` (the turns `following` come after them):
    [(P, X, [Y_1, ...])]. Y_1 = the following turns (at most cfg.sync_len tokens) and, when they
    fit whole, the first probe after them (the layout a later question has); further probes
    follow P directly."""
    p = tok.encode(header(tok, system), bos=tok.add_bos)
    x = tok.encode(segment(tok, system, [], old))
    from .probes import make_probes

    probes = []
    for q, a in make_probes(plain(old), probe_kinds(cfg.probes)):
        probes.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    follow = tok.encode(segment(tok, system, old, following)) if following else []
    ys = []
    if follow and len(follow) <= cfg.sync_len:
        if probes:
            ys.append(follow + tok.encode(segment(tok, system, old + following, probes[0])))
            probes = probes[1:]
        else:
            ys.append(follow)
    elif follow and cfg.sync_len > 0:
        ys.append(follow[:cfg.sync_len])
    ys += [tok.encode(segment(tok, system, old, pr)) for pr in probes]
    if not ys:
        raise UserError("nothing to absorb the turns on: give --probes or a --sync-len > 0")
    return [(p, x, ys)]


# ----------------------------------------------------------------------------- the session

@dataclass
class Stats:
    tokens_seen: int = 0          # tokens of every exchange, as rendered in the chat template
    tokens_absorbed: int = 0      # of those, tokens absorbed into the LoRA
    absorptions: int = 0
    exchanges: int = 0
    kv_tokens: int = 0            # KV cache of the last answer: its prompt + the answer
    last_absorb_seconds: float = 0.0
    last_absorb_steps: int = 0
    last_absorb_loss: str = ""


def resolve_window(cfg: ChatConfig, max_seq_len: int) -> int:
    w = cfg.window if cfg.window is not None else min(WINDOW_MAX, max_seq_len // 4)
    if w + cfg.max_tokens + 64 > max_seq_len:
        raise UserError(f"--window {w} + --max-tokens {cfg.max_tokens} do not fit the model's context of "
                        f"{max_seq_len} tokens")
    return w


class ChatSession:
    """A conversation with a verbatim window and an absorbed memory (the model's LoRA)."""

    def __init__(self, model, tok, cfg: ChatConfig, recipe: AbsorbConfig):
        from .absorber import resolve_config
        from .lora import apply_lora, lora_modules

        check_chat_tokenizer(tok)
        self.model, self.tok, self.cfg = model, tok, cfg
        self.recipe = resolve_config(tok, recipe)
        if not lora_modules(model):
            torch.manual_seed(self.recipe.seed)
            apply_lora(model, self.recipe.lora)
        self.window = resolve_window(cfg, model.cfg.max_seq_len)
        self.turns: list = []
        self.stats = Stats()
        self.transcript: list = []
        self.gen = torch.Generator(device=model.embed.weight.device).manual_seed(self.recipe.seed)

    # ---- sizes
    def n_tokens(self, turns: list) -> int:
        return len(self.tok.encode(segment(self.tok, self.cfg.system, [], turns))) if turns else 0

    def window_tokens(self) -> int:
        return self.n_tokens(self.turns)

    def prompt_ids(self, user: str) -> list:
        text = render(self.tok, self.cfg.system, self.turns + [{"role": "user", "content": user}], gen=True)
        return self.tok.encode(text, bos=self.tok.add_bos)

    def adapter_bytes(self) -> int:
        from .lora import lora_parameters

        return sum(p.numel() * p.element_size() for p in lora_parameters(self.model))

    # ---- answering
    @torch.no_grad()
    def answer(self, user: str, on_token: Optional[Callable[[str], None]] = None,
               log: Optional[Callable[[dict], None]] = None) -> str:
        """Answer `user` from the window + memory (streaming pieces to on_token), then append the
        exchange. Absorbs first only if the prompt would not fit the model's context."""
        from .sampling import generate
        from .tokenizer import StreamDecoder

        limit = self.model.cfg.max_seq_len - self.cfg.max_tokens
        ids = self.prompt_ids(user)
        while len(ids) > limit and self.turns:
            self.absorb(self._oldest_exchange_count(len(ids) - limit), log)
            ids = self.prompt_ids(user)
        if len(ids) > limit:
            raise UserError(f"message too long: {len(ids)} tokens with the chat header; the model's context holds "
                            f"{self.model.cfg.max_seq_len} (answer included)")
        dec, out = StreamDecoder(self.tok), []
        for t in generate(self.model, ids, self.cfg.max_tokens, self.cfg.temperature, None, self.cfg.top_p,
                          stop_ids=self.tok.stop_ids, generator=self.gen):
            if t in self.tok.stop_ids:
                break
            out.append(t)
            piece = dec.push(t)
            if piece and on_token:
                on_token(piece)
        tail = dec.flush()
        if tail and on_token:
            on_token(tail)
        text = self.tok.decode(out).strip()
        ex = [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        self.turns += ex
        self.stats.exchanges += 1
        self.stats.tokens_seen += self.n_tokens(ex)
        self.stats.kv_tokens = len(ids) + len(out)
        self.transcript.append({"user": user, "answer": text, "time": time.time()})
        return text

    # ---- absorbing
    def _oldest_exchange_count(self, need_tokens: int) -> int:
        """How many of the oldest turns to absorb to free at least need_tokens (whole exchanges)."""
        n, freed = 0, 0
        for ex in exchanges(self.turns):
            if freed >= need_tokens:
                break
            n += len(ex)
            freed += self.n_tokens(ex)
        return n

    def due(self) -> int:
        """Turns to absorb now: 0 while the window fits, else the oldest exchanges that bring it
        down to keep x window tokens (the latest exchange stays, if it fits the window alone)."""
        have = self.window_tokens()
        if have <= self.window:
            return 0
        n = self._oldest_exchange_count(have - int(self.cfg.keep * self.window))
        last = exchanges(self.turns)[-1]
        if self.n_tokens(last) <= self.window:     # the latest exchange stays verbatim when it fits
            n = min(n, len(self.turns) - len(last))
        return n

    def maybe_absorb(self, log: Optional[Callable[[dict], None]] = None):
        n = self.due()
        return self.absorb(n, log) if n else None

    def absorb(self, n_turns: Optional[int] = None, log: Optional[Callable[[dict], None]] = None):
        """Absorb the oldest n_turns (all, when None) into the LoRA; they leave the window.
        log gets {"phase": "start", "turns", "tokens", "steps"} then absorb_chunk's step dicts."""
        n = len(self.turns) if n_turns is None else n_turns
        old, following = self.turns[:n], self.turns[n:]
        if not old:
            return None
        groups = absorb_groups(self.tok, self.cfg.system, old, following, self.recipe)
        n_x = len(groups[0][1])
        if log:
            log({"phase": "start", "turns": len(old), "tokens": n_x, "steps": self.recipe.steps,
                 "y_tokens": sum(len(y) for _, _, ys in groups for y in ys)})
        res = absorb_chunk(self.model, groups, self.recipe, log)
        self.turns = following
        self.stats.tokens_absorbed += self.n_tokens(old)
        self.stats.absorptions += 1
        self.stats.last_absorb_seconds = round(res.seconds, 2)
        self.stats.last_absorb_steps = res.steps
        self.stats.last_absorb_loss = f"{res.first_loss:.4f} -> {res.final_loss:.4f} ({res.stopped})"
        self.transcript.append({"command": "absorbed", "turns": len(old), "tokens": n_x, "seconds": res.seconds,
                                "time": time.time()})
        return res

    def forget(self) -> None:
        from .lora import reset_lora

        reset_lora(self.model, seed=self.recipe.seed)
        self.turns, self.stats = [], Stats()
        self.transcript.append({"command": "/forget", "time": time.time()})

    def stats_dict(self) -> dict:
        return {**asdict(self.stats), "window_tokens": self.window_tokens(), "window": self.window,
                "adapter_mb": round(self.adapter_bytes() / 1e6, 2)}


# ----------------------------------------------------------------------------- the memory folder

class MemoryDir:
    """A chat's persistent memory folder (see the module docstring). Open it with lock(); the
    lock is held until close() or the process ends."""

    def __init__(self, path):
        self.path = Path(path)
        self.config_file = self.path / "config.json"
        self.state_file = self.path / "state.safetensors"
        self.transcript_file = self.path / "transcript.jsonl"
        self._fd = None

    def lock(self) -> "MemoryDir":
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{self.path}: this memory is in use by another chat.py (locked); close it first or "
                            f"give another --memory folder") from None
        self._fd = fd
        for tmp in self.path.glob(".*.tmp"):     # left by a kill during a write (we hold the lock)
            tmp.unlink(missing_ok=True)
        return self

    def close(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def exists(self) -> bool:
        return self.state_file.exists()

    @staticmethod
    def identity(session: ChatSession) -> dict:
        """What must match for a memory to be reopened by this model and these settings."""
        from .lora import base_fingerprint

        return {"version": STATE_VERSION, "base_fingerprint": base_fingerprint(session.model),
                "lora": session.model.lora_config, "window": session.window, "keep": session.cfg.keep,
                "system": session.cfg.system}

    def check(self, session: ChatSession) -> None:
        """Refuse a folder made with another base model or settings (one line)."""
        if not self.config_file.exists():
            return
        try:
            saved = json.loads(self.config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{self.config_file}: unreadable ({e})") from None
        want = self.identity(session)
        for k, v in want.items():
            if saved.get(k) != v:
                what = "another base model" if k == "base_fingerprint" else f"{k} = {saved.get(k)!r} (now {v!r})"
                raise UserError(f"{self.path}: this memory was made with {what}; use the same model and settings "
                                f"or another --memory folder")

    def save(self, session: ChatSession) -> None:
        """Transcript, then config, then the state (the state is the commit point)."""
        from .lora import lora_state_dict

        lines = "".join(json.dumps(t) + "\n" for t in session.transcript)
        atomic_write_text(self.transcript_file, lines)
        atomic_write_text(self.config_file, json.dumps(self.identity(session), indent=2))
        tensors = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(session.model).items()}
        md = {"nanoabsorber.chat_state": str(STATE_VERSION), "turns": json.dumps(session.turns),
              "stats": json.dumps(asdict(session.stats)), "transcript_len": str(len(session.transcript))}
        atomic_save_safetensors(tensors, self.state_file, metadata=md)

    def load(self, session: ChatSession) -> None:
        """Restore the LoRA, the window, the counters and the transcript from the folder."""
        from safetensors import SafetensorError, safe_open

        from .lora import lora_state_dict

        try:
            with safe_open(str(self.state_file), framework="pt") as f:
                md = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            turns, stats, n_tr = json.loads(md["turns"]), json.loads(md["stats"]), int(md["transcript_len"])
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise UserError(f"{self.state_file}: not a readable chat state ({str(e).splitlines()[0]})") from None
        expected = lora_state_dict(session.model)
        if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in tensors):
            raise UserError(f"{self.state_file}: its LoRA does not match this model's LoRA layout")
        session.model.load_state_dict({k: t.to(expected[k].device, expected[k].dtype) for k, t in tensors.items()},
                                      strict=False)
        session.turns = turns
        session.stats = Stats(**stats)
        transcript = []
        if self.transcript_file.exists():
            for line in self.transcript_file.read_text(encoding="utf-8").splitlines():
                try:
                    transcript.append(json.loads(line))
                except ValueError:
                    break
        session.transcript = transcript[:n_tr]


__all__ = ["ChatConfig", "ChatSession", "MemoryDir", "Stats", "CHAT_RECIPE", "CHAT_SKIP", "chat_recipe",
           "absorb_groups", "render", "segment", "plain"]
