"""Absorb a document into a model's weights (a LoRA adapter), then use the model without it.

    python absorb.py                                   # demo: absorb a short document, then ask about it
    python absorb.py --context notes.txt --out notes.safetensors
    cat book.txt | python absorb.py --context - --out book.safetensors --chunk 1024 --sync-len 512
    python sample.py --adapter notes.safetensors --chat --prompt "What does the text say about X?"

Algorithm (Absorber LLM): the teacher is the model with the text in its window; the student is
the LoRA model without it; the LoRA is trained so the student's hidden states on the following
text Y match the teacher's (all layers, L1). Long texts are absorbed window by window (n tokens,
with m following tokens as Y). For chat models, Y also holds probe conversations about the text
(see nanoabsorber/probes.py). Every recipe flag comes from nanoabsorber.absorber.AbsorbConfig.
"""
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from nanoabsorber import load
from nanoabsorber.absorber import AbsorbConfig, absorb_text, resolve_config, uses_chat_probes
from nanoabsorber.cli import (Parser, RunConfig, UserError, add_flags, build, check_ckpt, check_output_path,
                              print_config, read_json_file, read_text_file, run, setup)
from nanoabsorber.config import non_negative, setting
from nanoabsorber.lora import export_peft, lora_parameters, lora_state_dict, reset_lora, save_adapter
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
    qpath = opts.questions or (DEMO_QUESTIONS if opts.context is None else None)
    return text, name, out, read_questions(qpath) if qpath else []


class Progress:
    """One status line, rewritten in place on a terminal (new lines otherwise)."""

    def __init__(self, total_tokens: int, steps: int):
        self.total, self.steps, self.t0 = total_tokens, steps, time.time()
        self.tty = sys.stderr.isatty()

    def __call__(self, d: dict):
        width = 24
        frac = (d["chunk"] - 1 + d["step"] / max(self.steps, 1)) / d["chunks"]
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        line = (f"[{bar}] window {d['chunk']}/{d['chunks']} step {d['step']:>3}/{self.steps} "
                f"loss {d['loss']:.4f} absorbed {d['absorbed']}/{self.total} tok "
                f"{time.time() - self.t0:6.1f}s")
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
        absorb_text(model, tok, text, replace(cfg, objective="ntp"), log=Progress(len(ctx), cfg.steps))
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


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    run_cfg, opts, cfg = build(p, RunConfig, args), build(p, AbsorbScript, args), build(p, AbsorbConfig, args)
    if opts.compare_ntp and not opts.eval_holdout:
        p.error("argument --compare-ntp: needs --eval-holdout N")
    text, name, out, questions = read_inputs(opts, run_cfg)
    print_config("absorb.py", run_cfg, opts, cfg)
    setup(run_cfg)
    torch.manual_seed(cfg.seed)

    t0 = time.time()
    model, tok = load(run_cfg.ckpt, device=run_cfg.device, dtype=run_cfg.dtype)
    ids = tok.encode(text)
    holdout = []
    if opts.eval_holdout:
        if opts.eval_holdout >= len(ids) // 2:
            raise UserError(f"{name}: --eval-holdout {opts.eval_holdout} needs a context of more than "
                            f"{2 * opts.eval_holdout} tokens (it has {len(ids)})")
        holdout, text = ids[-opts.eval_holdout:], tok.decode(ids[:-opts.eval_holdout])
    n_tokens = len(tok.encode(text))
    print(f"loaded model in {time.time() - t0:.1f}s; context {name}: {len(text)} chars, {n_tokens} tokens",
          file=sys.stderr)
    if n_tokens < cfg.chunk:
        print(f"note: the context ({n_tokens} tokens) is shorter than one window (--chunk {cfg.chunk}); "
              f"absorbing it as a single window", file=sys.stderr)
    chat = uses_chat_probes(tok, cfg)
    if n_tokens > 16 * cfg.chunk and cfg.sync_len == 0 and not chat:
        raise UserError("--sync-len 0 and no probes: nothing to synchronise on")

    before = []
    if questions:
        print(f"asking {len(questions)} questions before absorbing ...", file=sys.stderr)
        before = [ask(model, tok, questions), ask(model, tok, questions, doc=text)]

    cfg = resolve_config(tok, cfg)
    print(f"Y per window: up to {cfg.sync_len} following tokens"
          f"{f', {cfg.gen_tokens} generated where the text runs out' if cfg.gen_tokens else ''}"
          f"{f', chat probes ({cfg.probes})' if chat else ''}; lr {cfg.lr:g}, {cfg.steps} steps", file=sys.stderr)
    prog = Progress(n_tokens, cfg.steps)
    t1 = time.time()
    results = absorb_text(model, tok, text, cfg, log=prog)
    prog.done()
    t_abs = time.time() - t1
    bad = [i + 1 for i, r in enumerate(results) if r.stopped == "non-finite loss"]
    if bad:
        print(f"warning: non-finite loss in window(s) {bad}: stopped there and kept the last good adapter "
              f"(try a lower --lr)", file=sys.stderr)

    save_adapter(model, out, tokens_absorbed=n_tokens, source_sha256=hashlib.sha256(text.encode()).hexdigest(),
                 source_name=Path(name).name, absorb_config=json.dumps(asdict(cfg)), probes=cfg.probes)
    if opts.peft:
        from nanoabsorber.default_model import HUB_NAME

        export_peft(model, opts.peft, base_model_name=str(Path(run_cfg.ckpt).resolve()) if run_cfg.ckpt else HUB_NAME)
    n_lora = sum(p.numel() for p in lora_parameters(model))
    kv_bytes = kv_cache_bytes(model.cfg, n_tokens, model.embed.weight.element_size())
    steps = sum(r.steps for r in results)
    print(f"\nabsorbed {n_tokens} tokens in {len(results)} window(s), {steps} steps, {t_abs:.1f}s "
          f"({t_abs / max(steps, 1):.2f}s/step, {t_abs / max(n_tokens, 1) * 1000:.1f}s per 1k tokens)")
    print(f"loss: first {results[0].first_loss:.4f} -> final {results[-1].final_loss:.4f} "
          f"(window 1 stopped at: {results[0].stopped})")
    print(f"adapter: {out} ({out.stat().st_size / 1e6:.2f} MB, {n_lora / 1e6:.2f}M parameters) vs the KV cache "
          f"the context would need: {kv_bytes / 1e6:.2f} MB ({run_cfg.dtype})")

    if holdout:
        print_holdout(holdout_scores(model, tok, text, holdout, cfg, opts.compare_ntp), len(holdout) - 1)
    if questions:
        print_answers(questions, *before, ask(model, tok, questions))
    print(f"total time {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run(main)
