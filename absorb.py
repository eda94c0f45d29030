"""Absorb a document into a model's weights (a LoRA adapter), then use the model without it.

    python absorb.py                                   # demo: absorb a short document, then ask about it
    python absorb.py --context notes.txt --out notes.safetensors
    cat book.txt | python absorb.py --context - --out book.safetensors --chunk 1024 --sync-len 512
    python sample.py --adapter notes.safetensors --chat --prompt "What does the text say about X?"

Algorithm (Absorber LLM): the teacher is the model with the text in its window; the student is
the LoRA model without it; the LoRA is trained so the student's hidden states on the following
text Y match the teacher's (all layers, L1). Long texts are absorbed window by window (n tokens,
with m following tokens as Y). For chat models, Y also holds probe conversations about the text
(see nanoabsorber/probes.py).
"""
import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from nanoabsorber import DTYPES, load
from nanoabsorber.absorber import (DEFAULT_PROBES, PROBE_LR, RAW_GEN_TOKENS, RAW_TEXT_LR, AbsorbConfig, absorb_text,
                                   probe_kinds, uses_chat_probes)
from nanoabsorber.attention import set_attention_impl
from nanoabsorber.cli import UserError, add_model_args, decode_text, print_config, read_text_file, run
from nanoabsorber.lora import apply_lora, export_peft, lora_parameters, save_adapter

ASSETS = Path(__file__).resolve().parent / "nanoabsorber" / "assets"
DEMO_DOC = ASSETS / "demo_document.txt"
DEMO_QUESTIONS = ASSETS / "demo_questions.json"
D = AbsorbConfig()


def read_context(arg: str | None) -> tuple[str, str]:
    """(text, name) from a file, '-' (stdin) or the demo document; one-line errors for bad input."""
    if arg == "-":
        return decode_text(sys.stdin.buffer.read(), "<stdin>"), "<stdin>"
    name = str(arg or DEMO_DOC)
    return read_text_file(name), name


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--context", default=None, help="text file to absorb, or - for stdin (default: the demo document)")
    p.add_argument("--out", default=None, help="adapter path (.safetensors); default: <context name>.adapter.safetensors")
    p.add_argument("--peft", default=None, help="also export the adapter in PEFT layout to this folder")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scale = alpha / rank)")
    p.add_argument("--targets", default="all", help="LoRA targets: comma list of q,k,v,o,gate,up,down or 'all'")
    p.add_argument("--steps", type=int, default=D.steps, help="max optimizer steps per window (K)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"AdamW learning rate (default {PROBE_LR:g} with chat probes, {RAW_TEXT_LR:g} for raw-text Y only)")
    p.add_argument("--eps", type=float, default=D.eps, help="early stop when the loss falls below this")
    p.add_argument("--chunk", type=int, default=D.chunk, help="n: tokens absorbed per window")
    p.add_argument("--sync-len", type=int, default=D.sync_len, help="m: following tokens used as Y per window")
    p.add_argument("--gen-tokens", type=int, default=None,
                   help="teacher-generated Y tokens where the following text is short (last window); "
                        f"default 0 when chat probes are used, else {RAW_GEN_TOKENS}")
    p.add_argument("--probes", default=DEFAULT_PROBES,
                   help="chat probe kinds added to Y for chat models, comma list of recite, entity, cloze, "
                        "continue ('' for none); see nanoabsorber/probes.py")
    p.add_argument("--batch-tokens", type=int, default=D.batch_tokens, help="Y tokens per step (0 = all)")
    p.add_argument("--loss", default=D.loss, choices=["l1", "mse", "l1_norm", "kl", "hybrid"],
                   help="sync loss: hidden-state l1 (paper), mse, l1_norm, kl (logits only), hybrid (l1_norm + kl)")
    p.add_argument("--objective", default=D.objective, choices=["sync", "ntp"],
                   help="sync (Absorber) or ntp (next-token prediction on the text: TTT / Temp-LoRA baseline)")
    p.add_argument("--questions", default=None,
                   help="JSON list of {question, answers} to ask before/after (default: the demo's, for the demo)")
    p.add_argument("--eval-holdout", type=int, default=0,
                   help="hold out the last N tokens of the context and report NLL/KL on them: no context, "
                        "full context, absorbed (measured, printed in the summary)")
    p.add_argument("--compare-ntp", action="store_true",
                   help="with --eval-holdout: also absorb with next-token prediction (same steps) and compare")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args()
    print_config("absorb.py", args)
    set_attention_impl(args.attn)
    torch.manual_seed(args.seed)
    demo = args.context is None
    try:
        probe_kinds(args.probes)
    except ValueError as e:
        raise UserError(f"--probes: {e}") from None
    text, name = read_context(args.context)
    out = Path(args.out) if args.out else Path((Path(name).stem if name != "<stdin>" else "stdin") + ".adapter.safetensors")
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: the adapter file must end in .safetensors")
    qpath = args.questions or (DEMO_QUESTIONS if demo else None)
    questions = json.loads(Path(qpath).read_text()) if qpath else []

    t0 = time.time()
    model, tok = load(args.ckpt, device=args.device, dtype=DTYPES[args.dtype])
    n_tokens = len(tok.encode(text))
    holdout = None
    if args.eval_holdout:
        all_ids = tok.encode(text)
        if args.eval_holdout >= len(all_ids) // 2:
            raise UserError(f"{name}: --eval-holdout {args.eval_holdout} needs a context of more than "
                            f"{2 * args.eval_holdout} tokens (it has {len(all_ids)})")
        holdout = all_ids[-args.eval_holdout:]
        text = tok.decode(all_ids[:-args.eval_holdout])
        n_tokens = len(tok.encode(text))
    print(f"loaded model in {time.time() - t0:.1f}s; context {name}: {len(text)} chars, {n_tokens} tokens",
          file=sys.stderr)
    if n_tokens < args.chunk:
        print(f"note: the context ({n_tokens} tokens) is shorter than one window (--chunk {args.chunk}); "
              f"absorbing it as a single window", file=sys.stderr)
    if n_tokens > 16 * args.chunk and args.sync_len == 0 and not args.probes:
        raise UserError("--sync-len 0 and no probes: nothing to synchronise on")

    from nanoabsorber.probes import answer, is_correct

    before = []
    if questions:
        print(f"asking {len(questions)} questions before absorbing ...", file=sys.stderr)
        with torch.no_grad():
            for q in questions:
                before.append((answer(model, tok, q["question"]), answer(model, tok, q["question"], doc=text)))

    if holdout:
        from nanoabsorber.metrics import target_logprobs

        prefix = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
        ctx = tok.encode(text)[-(model.cfg.max_seq_len - len(holdout) - len(prefix)):]
        print(f"holdout: scoring {len(holdout)} held-out tokens with the full context ({len(ctx)} tokens) "
              f"and with none ...", file=sys.stderr)
        logp_full = target_logprobs(model, prefix, ctx, holdout)
        logp_none = target_logprobs(model, prefix, [], holdout)

    chat = uses_chat_probes(tok, args.probes, args.objective)
    cfg = AbsorbConfig(objective=args.objective, loss=args.loss, steps=args.steps, lr=args.lr, eps=args.eps,
                       chunk=args.chunk, sync_len=args.sync_len, gen_tokens=args.gen_tokens,
                       batch_tokens=args.batch_tokens, seed=args.seed).resolved(chat)
    print(f"Y per window: up to {args.sync_len} following tokens"
          f"{f', {cfg.gen_tokens} generated where the text runs out' if cfg.gen_tokens else ''}"
          f"{f', chat probes ({args.probes})' if chat else ''}; lr {cfg.lr:g}, {cfg.steps} steps", file=sys.stderr)
    apply_lora(model, args.targets, args.rank, args.alpha)
    prog = Progress(n_tokens, args.steps)
    t1 = time.time()
    results = absorb_text(model, tok, text, cfg, probes=args.probes, log=prog)
    prog.done()
    t_abs = time.time() - t1
    bad = [i for i, r in enumerate(results) if r.stopped == "non-finite loss"]
    if bad:
        print(f"warning: non-finite loss in window(s) {[i + 1 for i in bad]}: stopped there and kept the last "
              f"good adapter (try a lower --lr)", file=sys.stderr)

    meta = {"tokens_absorbed": n_tokens, "source_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "source_name": Path(name).name, "absorb_config": json.dumps(cfg.__dict__), "probes": args.probes}
    save_adapter(model, out, **meta)
    if args.peft:
        export_peft(model, args.peft)

    n_lora = sum(p.numel() for p in lora_parameters(model))
    c = model.cfg
    elt = model.embed.weight.element_size()
    kv_bytes = 2 * c.n_layers * c.n_kv_heads * c.head_dim * n_tokens * elt
    steps = sum(r.steps for r in results)
    print(f"\nabsorbed {n_tokens} tokens in {len(results)} window(s), {steps} steps, {t_abs:.1f}s "
          f"({t_abs / max(steps, 1):.2f}s/step, {t_abs / max(n_tokens, 1) * 1000:.1f}s per 1k tokens)")
    print(f"loss: first {results[0].first_loss:.4f} -> final {results[-1].final_loss:.4f} "
          f"(window 1 stopped at: {results[0].stopped})")
    print(f"adapter: {out} ({out.stat().st_size / 1e6:.2f} MB, {n_lora / 1e6:.2f}M parameters) vs the KV cache "
          f"the context would need: {kv_bytes / 1e6:.2f} MB ({args.dtype})")

    if holdout:
        from nanoabsorber.lora import lora_state_dict, reset_lora
        from nanoabsorber.metrics import kl, nll, recovered

        rows = {"no context": logp_none, "full context": logp_full,
                f"absorbed ({args.objective}, {args.loss})": target_logprobs(model, prefix, [], holdout)}
        if args.compare_ntp:
            saved = {k: v.clone() for k, v in lora_state_dict(model).items()}
            reset_lora(model, seed=args.seed)
            t2 = time.time()
            ntp_cfg = AbsorbConfig(**{**cfg.__dict__, "objective": "ntp"})
            prog_ntp = Progress(n_tokens, args.steps)
            absorb_text(model, tok, text, ntp_cfg, probes="", log=prog_ntp)
            prog_ntp.done()
            print(f"next-token-prediction absorption: {time.time() - t2:.1f}s", file=sys.stderr)
            rows["absorbed (ntp: TTT / Temp-LoRA)"] = target_logprobs(model, prefix, [], holdout)
            model.load_state_dict(saved, strict=False)
        n = min(v.shape[0] for v in rows.values())
        z = holdout[-n:]
        base = {k: nll(v[-n:], z) for k, v in rows.items()}
        print(f"\nheld-out continuation: {n} tokens (never absorbed)")
        print(f"{'method':<36} {'NLL/token':>9} {'KL(full||.)':>11} {'recovered':>9}")
        for k, v in rows.items():
            rec = recovered(base["no context"], base["full context"], base[k])
            print(f"{k:<36} {base[k]:9.4f} {kl(rows['full context'][-n:], v[-n:]):11.4f} {rec:9.3f}")

    if questions:
        with torch.no_grad():
            after = [answer(model, tok, q["question"]) for q in questions]
        score = [0, 0, 0]
        print("\nquestion | base model, no document | document in the prompt | absorbed, no document")
        for q, (b0, b1), a in zip(questions, before, after):
            oks = [is_correct(x, q["answers"]) for x in (b0, b1, a)]
            score = [s + o for s, o in zip(score, oks)]
            print(f"\nQ: {q['question']}  (expected: {q['answers'][0]})")
            for label, ans, ok in zip(("base    ", "with doc", "absorbed"), (b0, b1, a), oks):
                print(f"  {label} {'OK ' if ok else '-- '} {ans[:100]!r}")
        n = len(questions)
        print(f"\ncorrect: base {score[0]}/{n}, document in prompt {score[1]}/{n}, absorbed {score[2]}/{n}")
    print(f"total time {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run(main)
