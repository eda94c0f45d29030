"""Chat with constant memory: the last --window tokens of the conversation stay verbatim in the
prompt; what scrolls out of the window is absorbed into the model's LoRA (Absorber LLM), so the
KV cache stays bounded while the model still remembers. --memory DIR keeps it across sessions.

    python chat.py                                   # default model SmolLM2-135M-Instruct
    python chat.py --memory ~/.chat-memory           # remembers across sessions (reopen the folder)
    python chat.py --adapter notes.safetensors       # start from a document absorbed by absorb.py
    python chat.py --script turns.jsonl --out answers.jsonl   # no terminal: JSON lines in and out

In the chat: /remember (absorb the window now), /forget (reset the memory, asks y/N), /stats,
/save [adapter.safetensors] (save the memory; with a path also as an adapter for sample.py),
/quit. A script holds one {"user": "..."} or {"command": "/remember"} per line.

Absorbing (nanoabsorber/memory.py): X = the oldest turns in the chat template, Y = the turns that
follow them + chat probes about them (--probes), teacher = the model with the history. Each
absorption runs --steps optimizer steps (the chat default is cheap: see --steps); every recipe
flag comes from nanoabsorber.absorber.AbsorbConfig.
"""
import argparse
import json
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

from nanoabsorber import load
from nanoabsorber.absorber import AbsorbConfig
from nanoabsorber.cli import (Parser, RunConfig, UserError, add_flags, build, check_ckpt, check_output_path,
                              print_config, read_text_file, run, setup)
from nanoabsorber.io import atomic_write_text
from nanoabsorber.memory import CHAT_RECIPE, CHAT_SKIP, ChatConfig, ChatSession, MemoryDir

COMMANDS = ("/remember", "/forget", "/stats", "/save", "/quit")


def build_parser() -> Parser:
    p = Parser(prog="chat.py", description=__doc__)
    add_flags(p, RunConfig, title="model")
    add_flags(p, ChatConfig, title="chat")
    add_flags(p, AbsorbConfig, title="absorption recipe (per absorption)", skip=CHAT_SKIP)
    for a in p._actions:                     # the chat's own recipe defaults (memory.CHAT_RECIPE)
        if a.dest in CHAT_RECIPE:
            a.default = CHAT_RECIPE[a.dest]
            a.help = re.sub(r"\(default: [^)]*\)$", f"(chat default: {a.default})", a.help)
    return p


def read_script(path) -> list:
    """The script's items, every line checked (one-line errors naming file and line)."""
    items = []
    for i, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e})") from None
        ok = isinstance(d, dict) and (
            (isinstance(d.get("user"), str) and d["user"].strip() and "command" not in d)
            or (d.get("command") in COMMANDS and "user" not in d) or (
                isinstance(d.get("command"), str) and d["command"].split(" ", 1)[0] == "/save" and "user" not in d))
        if not ok:
            raise UserError(f'{path}:{i}: expected {{"user": "..."}} or {{"command": one of {", ".join(COMMANDS)}}}')
        items.append(d)
    if not items:
        raise UserError(f"{path}: no turns")
    return items


class Status:
    """The absorption status line on stderr: steps, loss, elapsed and ETA (rewritten in place on a
    terminal, every few steps as new lines otherwise)."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.steps, self.t0 = 0, time.time()

    def __call__(self, d: dict):
        if d.get("phase") == "start":
            self.steps, self.t0 = d["steps"], time.time()
            line = (f"absorbing {d['turns']} turn(s) ({d['tokens']} tokens) into memory: {d['steps']} steps on "
                    f"{d['y_tokens']} Y tokens; teacher pass ...")
            print(line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
            return
        s, el = d["step"], time.time() - self.t0
        eta = el / s * (self.steps - s)
        line = f"absorbing: step {s}/{self.steps} loss {d['loss']:.4f} {el:5.1f}s, ETA {eta:4.0f}s"
        if self.tty:
            print(f"\r\x1b[K{line}", end="", file=sys.stderr, flush=True)
        elif s == 1 or s % 5 == 0 or s == self.steps:
            print(line, file=sys.stderr, flush=True)

    def done(self, session: ChatSession, res):
        if res is None:
            return
        st = session.stats
        print(f"{chr(13) + chr(27) + '[K' if self.tty else ''}absorbed in {st.last_absorb_seconds:.1f}s "
              f"({st.last_absorb_steps} steps, loss {st.last_absorb_loss}); window {session.window_tokens()}/"
              f"{session.window} tokens, {st.tokens_absorbed} absorbed so far", file=sys.stderr, flush=True)


def absorb_due(session: ChatSession, mem, status: Status):
    """Save, absorb what overflowed the window (if anything), save again."""
    if mem:
        mem.save(session)
    n = session.due()
    if not n:
        return None
    res = session.absorb(n, status)
    status.done(session, res)
    if mem:
        mem.save(session)
    return res


def save_cmd(arg: str, session: ChatSession, mem) -> str:
    out = []
    if mem:
        mem.save(session)
        out.append(f"memory saved to {mem.path}")
    if arg:
        from nanoabsorber.lora import save_adapter

        if not arg.endswith(".safetensors"):
            raise UserError(f"{arg}: the adapter file must end in .safetensors")
        check_output_path(arg, "adapter")
        save_adapter(session.model, arg, tokens_absorbed=session.stats.tokens_absorbed, source_name="chat.py")
        out.append(f"adapter saved to {arg}")
    return "; ".join(out) or "nothing to save to: give --memory DIR (or /save adapter.safetensors)"


def scripted(session: ChatSession, mem, items: list, out_path) -> None:
    status, lines = Status(), []

    def emit(d: dict):
        line = json.dumps(d, ensure_ascii=False)
        lines.append(line)
        if out_path:
            atomic_write_text(out_path, "\n".join(lines) + "\n")
        else:
            print(line, flush=True)

    for d in items:
        cmd = d.get("command")
        if cmd is None:
            t0 = time.time()
            text = session.answer(d["user"], log=status)
            row = {"user": d["user"], "answer": text, "seconds": round(time.time() - t0, 3),
                   "kv_tokens": session.stats.kv_tokens}
            res = absorb_due(session, mem, status)
            row.update({"window_tokens": session.window_tokens(), "absorbed_turns": 0 if res is None else
                        session.transcript[-1]["turns"], "absorb_seconds": 0.0 if res is None else round(res.seconds, 2)})
            emit(row)
        elif cmd == "/remember":
            res = session.absorb(None, status)
            status.done(session, res)
            if mem:
                mem.save(session)
            emit({"command": cmd, "seconds": 0.0 if res is None else round(res.seconds, 2)})
        elif cmd == "/forget":
            session.forget()
            if mem:
                mem.save(session)
            emit({"command": cmd})
        elif cmd == "/stats":
            emit({"command": cmd, **session.stats_dict()})
        elif cmd.startswith("/save"):
            emit({"command": cmd, "result": save_cmd(cmd[5:].strip(), session, mem)})
        elif cmd == "/quit":
            break


def interactive(session: ChatSession, mem) -> None:
    status = Status()
    print("commands: /remember /forget /stats /save [adapter.safetensors] /quit", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            break
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd == "/quit":
                break
            if cmd == "/remember":
                if not session.turns:
                    print("nothing in the window to absorb", file=sys.stderr)
                    continue
                status.done(session, session.absorb(None, status))
                if mem:
                    mem.save(session)
            elif cmd == "/forget":
                try:
                    ok = input("forget everything (absorbed memory, window, counters)? [y/N] ").strip().lower()
                except EOFError:
                    ok = ""
                if ok in ("y", "yes"):
                    session.forget()
                    if mem:
                        mem.save(session)
                    print("memory reset", file=sys.stderr)
            elif cmd == "/stats":
                for k, v in session.stats_dict().items():
                    print(f"  {k}: {v}", file=sys.stderr)
            elif cmd == "/save":
                try:
                    print(save_cmd(arg.strip(), session, mem), file=sys.stderr)
                except UserError as e:
                    print(f"error: {e}", file=sys.stderr)
            else:
                print(f"unknown command {cmd}; use {' '.join(COMMANDS)}", file=sys.stderr)
            continue
        print("bot> ", end="", flush=True)
        try:
            session.answer(line, on_token=lambda s: print(s, end="", flush=True), log=status)
        except UserError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        print(flush=True)
        absorb_due(session, mem, status)


def main(argv=None):
    p = build_parser()
    ns = p.parse_args(argv)
    run_cfg, cfg = build(p, RunConfig, ns), build(p, ChatConfig, ns)
    recipe = build(p, AbsorbConfig, ns, skip=CHAT_SKIP)
    if cfg.out and not cfg.script:
        p.error("argument --out: needs --script FILE")
    items = read_script(cfg.script) if cfg.script else None
    if cfg.out:
        check_output_path(cfg.out, "answers")
    check_ckpt(run_cfg)
    if cfg.adapter:
        from nanoabsorber.lora import read_adapter

        read_adapter(cfg.adapter)                # a bad adapter file fails here, before the model loads
    mem = MemoryDir(cfg.memory).lock() if cfg.memory else None
    try:
        if mem and mem.exists() and cfg.adapter:
            raise UserError(f"{mem.path}: already holds a memory; --adapter only starts a new one")
        print_config("chat.py", run_cfg, cfg, argparse.Namespace(recipe=asdict(recipe)))
        setup(run_cfg)
        t0 = time.time()
        model, tok = load(run_cfg.ckpt, device=run_cfg.device, dtype=run_cfg.dtype)
        if cfg.adapter:
            from nanoabsorber.lora import load_adapter

            load_adapter(model, cfg.adapter)
        session = ChatSession(model, tok, cfg, recipe)
        restored = ""
        if mem:
            mem.check(session)
            if mem.exists():
                mem.load(session)
                restored = (f"; restored {mem.path}: {len(session.turns)} turns in the window, "
                            f"{session.stats.tokens_absorbed} tokens absorbed in {session.stats.absorptions} absorptions")
        print(f"loaded in {time.time() - t0:.1f}s; window {session.window} tokens, {session.recipe.steps} steps "
              f"per absorption (lr {session.recipe.lr:g}){restored}", file=sys.stderr, flush=True)
        if items is not None:
            scripted(session, mem, items, Path(cfg.out) if cfg.out else None)
        else:
            interactive(session, mem)
        if mem:
            mem.save(session)
    finally:
        if mem:
            mem.close()
    return 0


if __name__ == "__main__":
    run(main)
