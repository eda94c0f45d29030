"""Chat with memory vs full history vs the window alone, over multi-session conversations.

    python bench/bench_chat.py [--window 256] [--conversations 9] [--fillers 6] [--steps 24] [--threads 1]

Each conversation: session 1, the user states facts (one a turn), then talks about other things
long enough to push them out of the window; session 2 (a restart) asks about every fact. Methods:
  full     the whole history in the prompt (the KV cache grows with the conversation)
  window   the last --window tokens only; older turns are dropped
  memory   chat.py's ChatSession: the same window, what scrolls out is absorbed into the LoRA;
           between the sessions the state goes through a memory folder (MemoryDir save, then a
           fresh session loads it)
Answers are greedy; a fact counts when its expected string occurs in the answer (case-insensitive).
Since a 135M model often fails to phrase the answer even with the fact in its prompt, the bench also
reports the answer NLL: the mean NLL of the expected word after the reference answer's start
("Your sister's name is" -> " Ingrid"), lower = remembered better, and a forced-choice recall: the
fact counts when its value has the lowest answer NLL among all the values that fact takes across
the conversations (6 candidates, chance 1/6), so phrasing plays no part. Brackets: 95% bootstrap
intervals over conversations.
Writes bench/results/chat_bench.{json,md,png}: recall, KV tokens and memory, per-turn latency.
"""
import argparse
import datetime
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanoabsorber import load  # noqa: E402
from nanoabsorber.lora import reset_lora  # noqa: E402
from nanoabsorber.memory import ChatConfig, ChatSession, MemoryDir, chat_recipe  # noqa: E402
from nanoabsorber.model import kv_cache_bytes  # noqa: E402

# Three conversation shapes of three facts each: (statement, question, values). Conversation i takes
# shape i % 3 and value i // 3 of each fact (conversations 0-2 are the first benchmark's); the other
# values of a fact are the distractors of the forced-choice recall (chance = 1 / len(values)).
SHAPES = [
    [("Please remember this: my sister's name is {}.", "What is my sister's name?",
      ["Ingrid", "Beatrix", "Solveig", "Marisol", "Henrietta", "Yolanda"]),
     ("Also remember that I drive a {}.", "What car do I drive?", ["Volvo", "Subaru", "Peugeot", "Skoda", "Mazda", "Lancia"]),
     ("One more thing: my favourite number is {}.", "What is my favourite number?", ["417", "283", "961", "358", "742", "629"])],
    [("Please remember this: my cat is called {}.", "What is my cat called?",
      ["Pumpernickel", "Biscuit", "Marzipan", "Gingersnap", "Dumpling", "Waffles"]),
     ("Also remember that I grew up in {}.", "Where did I grow up?",
      ["Valparaiso", "Tromso", "Bratislava", "Winnipeg", "Marrakesh", "Adelaide"]),
     ("One more thing: I work as a {}.", "What is my job?",
      ["beekeeper", "locksmith", "cartographer", "glassblower", "ferryman", "blacksmith"])],
    [("Please remember this: my best friend is called {}.", "What is my best friend called?",
      ["Oskar", "Tobias", "Anselm", "Dmitri", "Lorenzo", "Ferdinand"]),
     ("Also remember that my flat is on {} Street.", "What street is my flat on?",
      ["Elm", "Maple", "Juniper", "Willow", "Birch", "Hawthorn"]),
     ("One more thing: my favourite fruit is the {}.", "What is my favourite fruit?",
      ["mango", "papaya", "lychee", "guava", "pomegranate", "kumquat"])],
]


def conversation_facts(i: int) -> list:
    """[(statement, question, expected, [all candidate values])] of conversation i."""
    shape, k = SHAPES[i % len(SHAPES)], i // len(SHAPES)
    if k >= len(shape[0][2]):
        raise SystemExit(f"bench_chat.py: at most {len(SHAPES) * len(shape[0][2])} conversations")
    return [(st.format(vals[k]), q, vals[k], vals) for st, q, vals in shape]


# session 1 is scripted on both sides (the assistant's turns are these fixed replies, so every method
# sees the same conversation and a small model's habit of repeating its last answer cannot carry a
# fact along); the model's own answer is still generated (and timed) at every turn, then replaced.
FACT_REPLY = "Got it, I will remember that."
FILLERS = [
    ("Can you explain how rainbows form?", "Sunlight enters raindrops, bends, reflects inside them and bends again on "
     "the way out, splitting into colours because each wavelength bends by a different amount."),
    ("Give me a tip for learning to cook.", "Start with a few simple recipes, cook them often, and taste as you go so "
     "you learn how salt, acid and heat change a dish."),
    ("What is photosynthesis?", "It is how plants turn light, water and carbon dioxide into sugar and oxygen, using "
     "chlorophyll in their leaves to capture the energy of sunlight."),
    ("Why is the sky blue?", "Air molecules scatter short blue wavelengths of sunlight much more than red ones, so blue "
     "light reaches our eyes from every direction of the sky."),
    ("Tell me about the Roman Empire.", "It grew from the city of Rome to rule the Mediterranean, lasted in the west "
     "until 476 and in the east, as Byzantium, until 1453."),
    ("How do airplanes fly?", "Wings are shaped and tilted so that air flowing over them is pushed downwards, and the "
     "reaction lifts the plane while the engines overcome drag."),
    ("What are some good habits for sleep?", "Keep a regular schedule, avoid screens and caffeine late in the day, and "
     "keep the bedroom dark, quiet and cool."),
    ("Explain what a black hole is.", "It is a region where gravity is so strong that nothing, not even light, can "
     "escape once it crosses the boundary called the event horizon."),
    ("How do vaccines work?", "They show the immune system a harmless piece or copy of a germ, so it learns to "
     "recognise it and can respond quickly to a real infection."),
]
METHODS = ("full", "window", "memory")


def run_method(method, model, tok, conv, args, rows, mem_root):
    cfg = ChatConfig(window=args.window, keep=args.keep, max_tokens=args.answer_tokens)
    qcfg = replace(cfg, max_tokens=args.question_tokens)
    recipe = chat_recipe(steps=args.steps, **{k: v for k, v in (("lr", args.lr), ("loss", args.loss),
                                                                  ("probes", args.probes)) if v is not None})
    reset_lora(model, seed=0)
    s = ChatSession(model, tok, cfg, recipe)
    turn = 0

    def say(user, session, phase, reply=None):
        nonlocal turn
        t0 = time.perf_counter()
        ans = session.answer(user)
        dt = time.perf_counter() - t0
        if reply is not None:                                     # scripted session 1: keep the fixed reply
            session.turns[-1]["content"] = reply
            session.transcript[-1]["answer"] = reply
        absorb_s = 0.0
        if method == "full":
            pass
        elif method == "window":
            n = session.due()
            session.turns = session.turns[n:]
        else:
            res = session.maybe_absorb()
            absorb_s = res.seconds if res else 0.0
        turn += 1
        mem_bytes = kv_cache_bytes(model.cfg, session.stats.kv_tokens, 4)
        adapter = session.adapter_bytes() if method == "memory" else 0
        rows.append({"method": method, "conv": conv["i"], "phase": phase, "turn": turn, "user": user, "answer": ans,
                     "seconds": round(dt, 3), "absorb_seconds": round(absorb_s, 2),
                     "kv_tokens": session.stats.kv_tokens, "kv_mb": round(mem_bytes / 1e6, 2),
                     "adapter_mb": round(adapter / 1e6, 2)})
        print(f"  {method:<6} c{conv['i']} t{turn:>2} {phase:<8} {dt:5.1f}s kv {session.stats.kv_tokens:>5}"
              f"{f' absorb {absorb_s:5.1f}s' if absorb_s else ''}  {ans[:60]!r}", file=sys.stderr, flush=True)
        return ans

    for fact, _, _, _ in conv["facts"]:
        say(fact, s, "fact", FACT_REPLY)
    for f, reply in conv["fillers"]:
        say(f, s, "filler", reply)
    # --- restart: session 2
    if method == "memory":
        folder = Path(tempfile.mkdtemp(dir=mem_root))
        md = MemoryDir(folder).lock()
        md.save(s)
        md.close()
        reset_lora(model, seed=0)                                # nothing survives but the folder
        s = ChatSession(model, tok, qcfg, recipe)
        md = MemoryDir(folder).lock()
        md.check(s)
        md.load(s)
        md.close()
    s.cfg = qcfg
    hits = []
    for fact, q, expect, values in conv["facts"]:
        q = f"{q} Answer in a few words."
        # before the answer changes the state: the expected word's NLL and every candidate's (forced choice)
        cand = {v: answer_nll(model, tok, s, q, fact.replace(expect, v), v) for v in values}
        ans = say(q, s, "question")
        hits.append(expect.lower() in ans.lower())
        rows[-1].update({"expect": expect, "correct": hits[-1], "answer_nll": round(cand[expect], 3),
                         "choice": min(cand, key=cand.get), "choice_correct": min(cand, key=cand.get) == expect,
                         "candidates": len(values)})
    return hits


@torch.no_grad()
def answer_nll(model, tok, session, question, fact, expect) -> float:
    """Mean NLL of the expected word's tokens after the reference answer's beginning: the fact
    in the second person up to that word ("Your sister's name is" -> " Ingrid"). A recall measure
    that does not depend on how well the small model phrases an answer."""
    said = fact.split(": ", 1)[-1].split("that ", 1)[-1].rstrip(".")
    ref = said.replace("my ", "your ").replace("My ", "Your ").replace("I ", "You ")
    ref = ref[0].upper() + ref[1:]
    head = ref[:ref.index(expect)].rstrip()
    a, b = tok.encode(head), tok.encode(head + " " + expect)
    assert b[:len(a)] == a, (head, expect)
    ids = session.prompt_ids(question) + b
    logp = model(torch.tensor([ids]))[0, :-1].float().log_softmax(-1)
    tgt = torch.tensor(ids[1:])
    lp = logp.gather(-1, tgt[:, None])[:, 0][-(len(b) - len(a)):]
    return float(-lp.mean())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--conversations", type=int, default=9, help="at most 18 (3 shapes x 6 values)")
    p.add_argument("--fillers", type=int, default=6, help="off-topic turns between the facts and the questions")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per absorption (chat.py's default)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--loss", default=None, help="sync loss (automatic: chat.py's recipe)")
    p.add_argument("--probes", default=None, help="probe kinds (automatic: chat.py's recipe)")
    p.add_argument("--answer-tokens", type=int, default=16, help="tokens of the (timed, discarded) answers in session 1")
    p.add_argument("--question-tokens", type=int, default=32, help="tokens of the answers to the questions")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "chat_bench"))
    p.add_argument("--replot", action="store_true", help="remake the .md and .png from the --out .json")
    args = p.parse_args()
    if args.replot:
        d = json.loads(Path(args.out).with_suffix(".json").read_text())
        saved = argparse.Namespace(**{**d["args"], "out": args.out, "date": d["date"]})
        sys.argv = d["command"].split()[1:]
        return report(saved, d["rows"], {m: tuple(v) for m, v in d["recall"].items()}, d["seconds"])
    torch.set_num_threads(args.threads)
    t_start = time.time()
    model, tok = load()
    convs = [{"i": i, "facts": conversation_facts(i),
              "fillers": [FILLERS[(i * 3 + j) % len(FILLERS)] for j in range(args.fillers)]}
             for i in range(args.conversations)]
    rows, recall = [], {}
    mem_root = tempfile.mkdtemp()
    for method in args.methods.split(","):
        hits = []
        for conv in convs:
            hits += run_method(method, model, tok, conv, args, rows, mem_root)
        recall[method] = (sum(hits), len(hits))
        print(f"{method}: recall {sum(hits)}/{len(hits)}", file=sys.stderr, flush=True)
    total = time.time() - t_start
    report(args, rows, recall, total)


def rate_ci(rows: list, key: str) -> str:
    """95% bootstrap interval of the rate of rows[key], resampling conversations."""
    from nanoabsorber.metrics import bootstrap_ci

    by = {}
    for x in rows:
        by.setdefault(x["conv"], []).append(bool(x[key]))
    lo, hi = bootstrap_ci(list(by.values()), lambda cs: sum(map(sum, cs)) / max(1, sum(map(len, cs))))
    return "" if lo != lo else f"[{lo:.2f}, {hi:.2f}]"


def report(args, rows, recall, total):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from nanoabsorber.io import atomic_path, atomic_write_text

    cmd = "python bench/bench_chat.py " + " ".join(sys.argv[1:])
    date = getattr(args, "date", None) or datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    atomic_write_text(out.with_suffix(".json"), json.dumps({"command": cmd, "date": date, "args": {k: v for k, v in vars(args).items() if k != "date"},
                                                            "recall": recall, "seconds": total, "rows": rows}, indent=1))
    methods = list(recall)
    lines = [f"# chat with memory: {cmd}", "",
             f"{date}; SmolLM2-135M-Instruct fp32, {args.threads} torch threads on a 2-core machine SHARED with other "
             f"work (timings noisy); window {args.window} tokens, {args.steps} steps per absorption, "
             f"{args.conversations} conversations x 3 facts, {args.fillers} off-topic turns (session 1 scripted: fixed "
             f"assistant replies; the model's {args.answer_tokens}-token answer is generated and timed, then replaced) between facts and "
             f"questions, questions after a restart (session 2); total {total / 60:.1f} min.", "",
             "| method | recall | forced-choice recall (chance 1/6) | answer NLL (mean) | max KV tokens | max KV MB (fp32) | adapter MB | answer s/turn (mean; last 3 "
             "of session 1) | absorptions | absorb s (mean) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        r = [x for x in rows if x["method"] == m]
        s1 = [x for x in r if x["phase"] != "question"]
        late = [x["seconds"] for x in s1[-3:]]
        ab = [x["absorb_seconds"] for x in r if x["absorb_seconds"] > 0]
        nll = [x["answer_nll"] for x in r if "answer_nll" in x]
        q = [x for x in r if "choice_correct" in x]
        lines.append(f"| {m} | {recall[m][0]}/{recall[m][1]} {rate_ci(q, 'correct')} | "
                     f"{sum(x['choice_correct'] for x in q)}/{len(q)} {rate_ci(q, 'choice_correct')} | {sum(nll) / len(nll):.2f} | {max(x['kv_tokens'] for x in r)} | "
                     f"{max(x['kv_mb'] for x in r):.1f} | {max(x['adapter_mb'] for x in r):.1f} | "
                     f"{sum(x['seconds'] for x in r) / len(r):.2f}; {sum(late) / len(late):.2f} | {len(ab)} | "
                     f"{(sum(ab) / len(ab)) if ab else 0:.1f} |")
    if "full" in methods and "memory" in methods:
        for key, what in (("correct", "recall"), ("choice_correct", "forced-choice recall")):
            f, mm = ([x[key] for x in rows if x["method"] == m and key in x] for m in ("full", "memory"))
            if f and sum(f):
                lines += ["", f"memory {what} / full-history {what}: {sum(mm) / sum(f):.2f}"]
    lines += ["", "Answers to the questions:", ""]
    for x in rows:
        if x["phase"] == "question":
            pick = f" choice {x['choice']!r}" if "choice" in x else ""
            lines.append(f"- {x['method']} c{x['conv']} {'OK' if x['correct'] else '--'} nll {x['answer_nll']:.2f}{pick} {x['user']!r} -> "
                         f"{x['answer'][:90]!r}")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines[:lines.index("Answers to the questions:")]))

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for m in methods:
        r = [x for x in rows if x["method"] == m and x["conv"] == 0]
        ax[0].plot([x["turn"] for x in r], [x["kv_tokens"] for x in r], marker="o", label=m)
        ax[1].plot([x["turn"] for x in r], [x["seconds"] for x in r], marker="o", label=f"{m} answer")
        if m == "memory":
            ab = [x for x in r if x["absorb_seconds"] > 0]
            ax[1].bar([x["turn"] for x in ab], [x["absorb_seconds"] for x in ab], alpha=0.3, color="gray",
                      label="memory: absorption after the turn")
    ax[0].set(xlabel="turn (conversation 1)", ylabel="KV tokens of the answer",
              title="KV cache per turn (window = memory)")
    ax[1].set(xlabel="turn (conversation 1)", ylabel="seconds", title="per-turn latency (shared CPU)")
    nlls = [[x["answer_nll"] for x in rows if x["method"] == m and "answer_nll" in x] for m in methods]
    ax[2].bar([f"{m}\nrecall {recall[m][0]}/{recall[m][1]}" for m in methods], [sum(v) / len(v) for v in nlls],
              color=["C0", "C1", "C2"][:len(methods)])
    ax[2].set(ylabel="answer NLL of the fact's word (lower = remembered)",
              title=f"recall after a restart (window {args.window})")
    for a in ax[:2]:
        a.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out.with_suffix(".png")) as tmp:
        fig.savefig(tmp, dpi=90, format="png")


if __name__ == "__main__":
    main()
