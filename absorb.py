"""Absorb a document into a model's weights (a LoRA adapter), then use the model without it.

    python absorb.py                                   # demo: absorb a short document, then ask about it
    python absorb.py --context notes.txt --out notes.safetensors
    cat book.txt | python absorb.py --context - --out book.safetensors --chunk 1024 --sync-len 512
    python absorb.py --context book.txt --out book.safetensors --resume     # after an interruption
    python absorb.py --adapter book.safetensors --context more.txt --out book2.safetensors   # it grew
    python absorb.py --context-dir docs/ --out-dir adapters/        # one adapter per text file; reruns skip
    python sample.py --adapter notes.safetensors --chat --prompt "What does the text say about X?"

Algorithm (Absorber LLM): the teacher is the model with the text in its window; the student is
the LoRA model without it; the LoRA is trained so the student's hidden states on the following
text Y match the teacher's (all layers, L1). Long texts are absorbed window by window (n tokens,
with m following tokens as Y). For chat models, Y also holds probe conversations about the text
(see nanoabsorber/probes.py). Every recipe flag comes from nanoabsorber.absorber.AbsorbConfig.
"""
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from nanoabsorber import load
from nanoabsorber.absorber import AbsorbConfig, absorb_text, resolve_config, uses_chat_probes
from nanoabsorber.cli import (Parser, RunConfig, UserError, add_flags, build, check_ckpt, check_output_path,
                              format_duration, print_config, read_json_file, read_text_file, run, setup)
from nanoabsorber.config import non_negative, setting
from nanoabsorber.absorb_state import is_finished, partial_path, resume_point, signature, state_meta
from nanoabsorber.absorber import chunk_windows
from nanoabsorber.cost import prefill_seconds, process_peak_bytes
from nanoabsorber.distributed import single_process, start_processes, stop_processes
from nanoabsorber.lora import (export_peft, load_adapter, lora_parameters, lora_state_dict, read_adapter, reset_lora,
                               save_adapter)
from nanoabsorber.model import kv_cache_bytes

ASSETS = Path(__file__).resolve().parent / "nanoabsorber" / "assets"
DEMO_DOC = ASSETS / "demo_document.txt"
DEMO_QUESTIONS = ASSETS / "demo_questions.json"


@dataclass
class AbsorbScript:
    """absorb.py's own settings (the recipe is AbsorbConfig, the model RunConfig)."""
    context: Optional[str] = setting(None, "text file to absorb, or - for stdin (automatic: the demo document)")
    out: Optional[str] = setting(None, "adapter path, .safetensors (automatic: <context name>.adapter.safetensors "
                                       "in the current folder)")
    peft: Optional[str] = setting(None, "also export the adapter in PEFT layout to this folder")
    questions: Optional[str] = setting(None, "JSON list of {question, answers} to ask before and after "
                                             "(automatic: the demo's questions, for the demo)")
    eval_holdout: int = setting(0, "hold out the last N tokens of the context and report NLL/KL on them: no "
                                   "context, full context, absorbed", check=non_negative)
    compare_ntp: bool = setting(False, "with --eval-holdout: also absorb with next-token prediction (same steps)")
    resume: bool = setting(False, "continue an interrupted absorption of the same text and recipe from its last "
                                  "finished window (saved after every window as <out>.partial)")
    adapter: Optional[str] = setting(None, "go on from this adapter (the model with it is the teacher): absorb "
                                           "a document that grew, incrementally")
    context_dir: Optional[str] = setting(None, "absorb every text file of this folder (*.txt, *.md) into its own "
                                               "adapter in --out-dir; finished ones are skipped on a rerun")
    out_dir: Optional[str] = setting(None, "with --context-dir: the folder of adapters (<file stem>.safetensors)")


def build_parser() -> Parser:
    p = Parser(prog="absorb.py", description=__doc__)
    add_flags(p, RunConfig, title="model")
    add_flags(p, AbsorbScript, title="input and output")
    add_flags(p, AbsorbConfig, title="recipe")
    return p


def read_questions(path) -> list:
    """[{question, answers}] from a JSON file, or a one-line UserError naming what is wrong."""
    qs = read_json_file(path)
    ok = isinstance(qs, list) and all(
        isinstance(q, dict) and isinstance(q.get("question"), str) and q["question"].strip()
        and isinstance(q.get("answers"), list) and q["answers"] and all(isinstance(a, str) and a for a in q["answers"])
        for q in qs)
    if not ok or not qs:
        raise UserError(f"{path}: expected a non-empty JSON list of "
                        '{"question": "...", "answers": ["...", ...]} objects')
    return qs


def read_inputs(opts: AbsorbScript, run_cfg: RunConfig) -> tuple:
    """(text, its name, adapter path, questions): every input read and checked, and every output
    place checked, before the slow model load."""
    name = "<stdin>" if opts.context == "-" else str(opts.context or DEMO_DOC)
    text = read_text_file(opts.context or DEMO_DOC)
    out = Path(opts.out or (Path(name).stem if name != "<stdin>" else "stdin") + ".adapter.safetensors")
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: the adapter file must end in .safetensors")
    check_output_path(out, "adapter")
    if opts.peft:
        check_output_path(Path(opts.peft) / "adapter_config.json", "PEFT adapter")
    check_ckpt(run_cfg)
    if opts.adapter:
        read_adapter(opts.adapter)                 # a bad adapter file: one line, before the model loads
    if opts.resume and opts.adapter and Path(opts.adapter).resolve() == out.resolve():
        raise UserError(f"{out}: --adapter and --out must differ")
    qpath = opts.questions or (DEMO_QUESTIONS if opts.context is None else None)
    return text, name, out, read_questions(qpath) if qpath else []


class Progress:
    """One status line with the ETA, rewritten in place on a terminal (new lines otherwise). After
    the first measured step it prints the estimated total time on a line of its own."""

    def __init__(self, total_tokens: int, steps: int, windows: int = 1, start: int = 0):
        self.total, self.steps, self.t0 = total_tokens, steps, time.time()
        self.windows, self.start, self.planned = windows, start, {}   # window -> its planned steps
        self.todo, self.done_steps, self.last = (windows - start) * steps, 0, None
        self.tty = sys.stderr.isatty()

    def __call__(self, d: dict):
        self.done_steps += 1
        if "of" in d and d["chunk"] not in self.planned:   # a window's steps are known once its Y is
            self.planned[d["chunk"]] = d["of"]
            per = sum(self.planned.values()) / len(self.planned)
            self.todo = round(sum(self.planned.values()) + per * (self.windows - self.start - len(self.planned)))
        self.steps = d.get("of", self.steps)
        elapsed = time.time() - self.t0
        eta = elapsed / self.done_steps * max(self.todo - self.done_steps, 0)
        if self.done_steps == 1:
            print(f"first step after {elapsed:.1f}s (teacher pass included): about {format_duration(elapsed * self.todo)} "
                  f"for {self.todo} steps{' (later windows estimated from this one)' if self.windows - self.start > 1 else ''}"
                  f" at most (early stops shorten it)", file=sys.stderr, flush=True)
        width = 24
        frac = (d["chunk"] - 1 + d["step"] / max(self.steps, 1)) / d["chunks"]
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        line = (f"[{bar}] window {d['chunk']}/{d['chunks']} step {d['step']:>3}/{self.steps} "
                f"loss {d['loss']:.4f} absorbed {d['absorbed']}/{self.total} tok "
                f"{format_duration(elapsed)}, ETA {format_duration(eta)}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def done(self):
        if self.tty:
            print(file=sys.stderr)


def ask(model, tok, questions: list, doc: Optional[str] = None) -> list[str]:
    from nanoabsorber.probes import answer

    with torch.no_grad():
        return [answer(model, tok, q["question"], doc=doc) for q in questions]


def holdout_scores(model, tok, text: str, holdout: list, cfg: AbsorbConfig, compare_ntp: bool) -> dict:
    """Held-out continuation after absorbing: eval.py's lm metrics on the never-absorbed tokens,
    for no context, full context, the absorbed adapter and (optionally) NTP absorption."""
    from nanoabsorber.metrics import continuation_scores, lm_logprobs

    prefix = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    ctx = tok.encode(text)[-(model.cfg.max_seq_len - len(holdout) - len(prefix)):]
    absorbed = {k: v.clone() for k, v in lora_state_dict(model).items()}
    reset_lora(model, seed=cfg.seed)                       # the base model: B = 0
    logps = {"none": lm_logprobs(model, prefix, [], holdout), "full": lm_logprobs(model, prefix, ctx, holdout)}
    model.load_state_dict(absorbed, strict=False)
    logps[f"absorbed ({cfg.objective}, {cfg.loss})"] = lm_logprobs(model, prefix, [], holdout)
    if compare_ntp:
        reset_lora(model, seed=cfg.seed)
        t0 = time.time()
        n_windows = len(chunk_windows(len(ctx), cfg.chunk, cfg.sync_len))
        absorb_text(model, tok, text, replace(cfg, objective="ntp"), log=Progress(len(ctx), cfg.steps, n_windows))
        print(f"\nnext-token-prediction absorption: {time.time() - t0:.1f}s", file=sys.stderr)
        logps["absorbed (ntp: TTT / Temp-LoRA)"] = lm_logprobs(model, prefix, [], holdout)
        model.load_state_dict(absorbed, strict=False)
    return continuation_scores(logps, holdout)


def print_holdout(scores: dict, n: int) -> None:
    names = {"none": "no context", "full": "full context"}
    print(f"\nheld-out continuation: {n} tokens (never absorbed)")
    print(f"{'method':<36} {'NLL/token':>9} {'KL(full||.)':>11} {'recovered':>9}")
    for k, s in scores.items():
        print(f"{names.get(k, k):<36} {s['nll']:9.4f} {s['kl']:11.4f} {s['recovered']:9.3f}")


def print_answers(questions: list, base: list, with_doc: list, absorbed: list) -> None:
    from nanoabsorber.metrics import lenient_match

    score = [0, 0, 0]
    print("\nquestion | base model, no document | document in the prompt | absorbed, no document")
    for q, *answers in zip(questions, base, with_doc, absorbed):
        oks = [lenient_match(a, q["answers"]) for a in answers]
        score = [s + o for s, o in zip(score, oks)]
        print(f"\nQ: {q['question']}  (expected: {q['answers'][0]})")
        for label, a, ok in zip(("base    ", "with doc", "absorbed"), answers, oks):
            print(f"  {label} {'OK ' if ok else '-- '} {a[:100]!r}")
    n = len(questions)
    print(f"\ncorrect: base {score[0]}/{n}, document in prompt {score[1]}/{n}, absorbed {score[2]}/{n}")


def absorb_resumable(model, tok, text: str, cfg: AbsorbConfig, opts: AbsorbScript, out: Path, n_tokens: int,
                     chat: bool, master: bool = True) -> tuple[list, float]:
    """absorb_text with the plan printed first, progress with ETA, the state saved after every
    window (<out>.partial) and, with --resume, the finished windows skipped. Under torchrun only
    the master (rank 0) prints and saves; every rank absorbs its share of each step."""
    sig = signature(text, cfg, opts.adapter)
    wins = chunk_windows(len(tok.encode(text)), cfg.chunk, cfg.sync_len)
    start = 0
    if opts.resume:
        part, start = resume_point(out, sig)
        load_adapter(model, part)
        say(f"resuming from {part}: {start} of {len(wins)} window(s) already absorbed", master)
    elif partial_path(out).exists() and master:
        print(f"note: {partial_path(out)} holds an interrupted absorption; starting over "
              f"(pass --resume to continue it instead)", file=sys.stderr)
    say(f"plan: {len(wins)} window(s) of up to {cfg.chunk} tokens; Y per window: up to {cfg.sync_len} following "
        f"tokens{f', {cfg.gen_tokens} generated where the text runs out' if cfg.gen_tokens else ''}"
        f"{f', chat probes ({cfg.probes})' if chat else ''}; lr {cfg.lr:g}, "
        + (f"{cfg.epochs:g} passes over each window's Y at {cfg.batch_tokens} Y tokens per step, at most {cfg.steps} "
           f"steps per window" if cfg.epochs > 0 and cfg.batch_tokens > 0 else f"up to {cfg.steps} steps per window"),
        master)

    def save_state(ci, res):
        save_adapter(model, partial_path(out), **state_meta(sig, ci + 1, len(wins)))

    prog = Progress(n_tokens, cfg.steps, len(wins), start) if master else None
    t1 = time.time()
    results = absorb_text(model, tok, text, cfg, log=prog, start=start, on_window=save_state if master else None)
    if prog:
        prog.done()
    bad = [start + i + 1 for i, r in enumerate(results) if r.stopped == "non-finite loss"]
    if bad:
        say(f"warning: non-finite loss in window(s) {bad}: stopped there and kept the last good adapter "
            f"(try a lower --lr)", master)
    return results, time.time() - t1


def say(msg: str, master: bool = True) -> None:
    if master:
        print(msg, file=sys.stderr, flush=True)


def print_summary(model, tok, text: str, results: list, t_abs: float, out: Path, run_cfg: RunConfig,
                  cfg: AbsorbConfig) -> None:
    """Time, tokens trained, peak memory, adapter size, and the measured break-even point."""
    n_tokens, steps = len(tok.encode(text)), sum(r.steps for r in results)
    trained = sum(min(r.y_tokens, cfg.batch_tokens or r.y_tokens) * r.steps for r in results)
    n_lora = sum(p.numel() for p in lora_parameters(model))
    kv_bytes = kv_cache_bytes(model.cfg, n_tokens, model.embed.weight.element_size())
    print(f"\nabsorbed {n_tokens} tokens in {len(results)} window(s), {steps} steps, {t_abs:.1f}s "
          f"({t_abs / max(steps, 1):.2f}s/step, {t_abs / max(n_tokens, 1) * 1000:.1f}s per 1k tokens); "
          f"{trained} Y tokens trained; peak memory {process_peak_bytes(run_cfg.device) / 1e9:.2f} GB")
    ran = [r for r in results if r.stopped != "nothing to absorb"]
    if ran:
        print(f"loss: first {ran[0].first_loss:.4f} -> final {ran[-1].final_loss:.4f} "
              f"(window 1 stopped at: {ran[0].stopped})")
    print(f"adapter: {out} ({out.stat().st_size / 1e6:.2f} MB, {n_lora / 1e6:.2f}M parameters) vs the KV cache "
          f"the context would need: {kv_bytes / 1e6:.2f} MB ({run_cfg.dtype})")
    # break-even: the adapter is paid once; the document in the prompt is prefilled at every question
    from nanoabsorber.probes import question_ids

    q = question_ids(tok, "What does the text say?") if tok.chat_format else tok.encode("What does the text say?")
    fit = model.cfg.max_seq_len - len(q)
    doc = tok.encode(text)[:fit]
    t_doc = prefill_seconds(model, doc + q) * (n_tokens + len(q)) / (len(doc) + len(q))   # scaled past the window
    t_q = prefill_seconds(model, q)
    saved = max(t_doc - t_q, 1e-9)
    print(f"break-even: after {math.ceil(t_abs / saved)} question(s) the adapter (question alone in the window, "
          f"prefill {t_q * 1000:.0f} ms) has cost less than the document in the prompt (prefill {t_doc:.2f}s "
          f"per question{', extrapolated past the context window' if len(doc) < n_tokens else ''}), measured here")


def absorb_document(model, tok, text: str, name: str, out: Path, opts: AbsorbScript, run_cfg: RunConfig,
                    cfg: AbsorbConfig) -> dict:
    """Absorb one text into `out` (resumable), write the adapter (+ PEFT), print the summary."""
    n_tokens = len(tok.encode(text))
    results, t_abs = absorb_resumable(model, tok, text, cfg, opts, out, n_tokens, uses_chat_probes(tok, cfg))
    n_windows = len(chunk_windows(n_tokens, cfg.chunk, cfg.sync_len))
    save_adapter(model, out, tokens_absorbed=n_tokens, source_sha256=hashlib.sha256(text.encode()).hexdigest(),
                 source_name=Path(name).name, absorb_config=json.dumps(asdict(cfg)), probes=cfg.probes,
                 **state_meta(signature(text, cfg, opts.adapter), n_windows, n_windows))
    partial_path(out).unlink(missing_ok=True)
    if opts.peft:
        from nanoabsorber.default_model import HUB_NAME

        export_peft(model, opts.peft, base_model_name=str(Path(run_cfg.ckpt).resolve()) if run_cfg.ckpt else HUB_NAME)
    print_summary(model, tok, text, results, t_abs, out, run_cfg, cfg)
    return {"tokens": n_tokens, "windows": n_windows, "seconds": t_abs}


def corpus_files(opts: AbsorbScript) -> list[Path]:
    """This process's share of --context-dir's text files (all of them without torchrun)."""
    import os

    d = Path(opts.context_dir)
    if not d.is_dir():
        raise UserError(f"{d}: not a folder")
    files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix in (".txt", ".md") and not f.name.startswith("."))
    if not files:
        raise UserError(f"{d}: no .txt or .md files")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return files[rank::world]


def run_corpus(opts: AbsorbScript, run_cfg: RunConfig, cfg: AbsorbConfig) -> int:
    """One adapter per text file; a file that fails is reported and skipped; finished ones (same
    text, recipe and start adapter) are skipped; a table at the end. Exit status 1 if any failed."""
    files, out_dir = corpus_files(opts), Path(opts.out_dir)
    model, tok = load(run_cfg.ckpt, device=run_cfg.device, dtype=run_cfg.dtype)
    cfg = resolve_config(tok, cfg)
    rows = []
    for i, f in enumerate(files):
        out = out_dir / f"{f.stem}.safetensors"
        print(f"\n[{i + 1}/{len(files)}] {f} -> {out}", file=sys.stderr)
        try:
            text = read_text_file(f)
            if is_finished(out, signature(text, cfg, opts.adapter)):
                rows.append((f.name, "skipped (finished)", "", "", ""))
                continue
            torch.manual_seed(cfg.seed)               # the LoRA init of a one-document run
            if lora_parameters(model):
                reset_lora(model, seed=cfg.seed)
            if opts.adapter:
                load_adapter(model, opts.adapter)
            r = absorb_document(model, tok, text, f.name, out, opts, run_cfg, cfg)
            rows.append((f.name, "absorbed", r["tokens"], r["windows"], f"{r['seconds']:.0f}"))
        except UserError as e:
            print(f"error: {e} (skipped)", file=sys.stderr)
            rows.append((f.name, "failed: " + str(e).replace(f"{f}: ", ""), "", "", ""))
    print(f"\n{'file':<32} {'status':<28} {'tokens':>7} {'windows':>7} {'seconds':>7}")
    for r in rows:
        print(f"{r[0]:<32} {r[1][:60]:<28} {r[2]:>7} {r[3]:>7} {r[4]:>7}")
    return 1 if any(r[1].startswith("failed") for r in rows) else 0


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    run_cfg, opts, cfg = build(p, RunConfig, args), build(p, AbsorbScript, args), build(p, AbsorbConfig, args)
    if opts.compare_ntp and not opts.eval_holdout:
        p.error("argument --compare-ntp: needs --eval-holdout N")
    if bool(opts.context_dir) != bool(opts.out_dir):
        p.error("argument --context-dir: --context-dir and --out-dir go together")
    if opts.context_dir:
        if opts.context or opts.out or opts.questions or opts.eval_holdout or opts.peft:
            p.error("argument --context-dir: absorbs a folder; --context, --out, --questions, --eval-holdout and "
                    "--peft are for one document")
        check_output_path(Path(opts.out_dir) / "x.safetensors", "adapters")
        corpus_files(opts)                      # a bad folder: one line, before the model loads
        print_config("absorb.py", run_cfg, opts, cfg)
        setup(run_cfg)
        torch.manual_seed(cfg.seed)
        return run_corpus(opts, run_cfg, cfg)
    text, name, out, questions = read_inputs(opts, run_cfg)
    procs = start_processes(run_cfg.device)         # torchrun: data-parallel over each step's Y
    run_cfg = replace(run_cfg, device=procs.device)
    if procs.master:
        print_config("absorb.py", run_cfg, opts, cfg)
    setup(run_cfg)
    torch.manual_seed(cfg.seed)
    try:
        code = absorb_one(text, name, out, questions, opts, run_cfg, cfg, procs)
        stop_processes(wait=True)
        return code
    finally:
        stop_processes()


def absorb_one(text: str, name: str, out: Path, questions: list, opts: AbsorbScript, run_cfg: RunConfig,
               cfg: AbsorbConfig, procs) -> int:
    """The one-document run: load, (ask before), absorb, save, summary, (held-out, ask after)."""
    t0 = time.time()
    model, tok = load(run_cfg.ckpt, device=run_cfg.device, dtype=run_cfg.dtype)
    if opts.adapter:
        load_adapter(model, opts.adapter)        # the teacher is the model with it; its LoRA layout is kept
    ids = tok.encode(text)
    holdout = []
    if opts.eval_holdout:
        if opts.eval_holdout >= len(ids) // 2:
            raise UserError(f"{name}: --eval-holdout {opts.eval_holdout} needs a context of more than "
                            f"{2 * opts.eval_holdout} tokens (it has {len(ids)})")
        holdout, text = ids[-opts.eval_holdout:], tok.decode(ids[:-opts.eval_holdout])
    n_tokens = len(tok.encode(text))
    say(f"loaded model in {time.time() - t0:.1f}s; context {name}: {len(text)} chars, {n_tokens} tokens", procs.master)
    cfg = resolve_config(tok, cfg)                 # the automatic settings, for this model and Y
    if n_tokens < cfg.chunk:
        say(f"note: the context ({n_tokens} tokens) is shorter than one window (--chunk {cfg.chunk}); "
            f"absorbing it as a single window", procs.master)
    chat = uses_chat_probes(tok, cfg)
    if n_tokens > 16 * cfg.chunk and cfg.sync_len == 0 and not chat:
        raise UserError("--sync-len 0 and no probes: nothing to synchronise on")

    before = []
    if questions and procs.master:
        say(f"asking {len(questions)} questions before absorbing ...")
        before = [ask(model, tok, questions), ask(model, tok, questions, doc=text)]

    if not procs.master:                           # the other ranks absorb their share; rank 0 writes
        absorb_resumable(model, tok, text, cfg, opts, out, n_tokens, chat, master=False)
        return 0
    absorb_document(model, tok, text, name, out, opts, run_cfg, cfg)
    with single_process():                         # evaluation after absorbing: rank 0 alone
        if holdout:
            print_holdout(holdout_scores(model, tok, text, holdout, cfg, opts.compare_ntp), len(holdout) - 1)
        if questions:
            print_answers(questions, *before, ask(model, tok, questions))
    say(f"total time {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    run(main)
