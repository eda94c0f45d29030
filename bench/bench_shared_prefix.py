"""The student pass with the shared prefix run once against it in every row (a script, not a test).

    python bench/bench_shared_prefix.py [--passages 16] [--batch-tokens 512] [--reps 3] [--threads 1]

Chat-probe rows all start with the chat template's system prompt (24 tokens on SmolLM2, Y rows of
~49 tokens): `absorber.sync_loss` runs that prefix once per micro-batch (`model.SharedPrefix`).
This takes the passage probes of a generated 2k-token catalogue (benchdocs.make_long_doc, seed 0),
the default recipe (hybrid loss, rank 16 on all projections, micro-batches of 256 padded tokens),
one teacher pass, then times one optimizer step's forward + backward over a fixed draw of
--batch-tokens Y tokens, alternating the two paths --reps times, and prints the ratio of the
medians and the largest difference of the LoRA gradients.
"""
import argparse
import statistics
import time

import torch

import nanoabsorber.absorber as ab
from nanoabsorber import load
from nanoabsorber.benchdocs import make_long_doc
from nanoabsorber.lora import apply_lora, lora_parameters
from nanoabsorber.probes import chat_probe_ids, passage_probes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--passages", type=int, default=16, help="passages whose probes make the rows")
    p.add_argument("--batch-tokens", type=int, default=512, help="Y tokens of the timed step")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load()
    cfg = ab.resolve_config(tok, ab.AbsorbConfig())
    apply_lora(model, cfg.lora)
    torch.manual_seed(0)
    with torch.no_grad():                    # a trained-looking adapter, so gradients are not trivial
        for q in lora_parameters(model):
            q.add_(torch.randn_like(q) * 0.01)
    doc = make_long_doc(0, 2048, lambda t: len(tok.encode(t)), "catalogue")
    spans = passage_probes(doc.text, ab.probe_kinds(cfg.probes))[:args.passages]
    groups = [chat_probe_ids(tok, text, pr)[:3] for _, text, pr in spans]
    t = ab.teacher_targets(model, groups, True, True)
    sizes = t.mask.sum(1).tolist()
    rows, total = [], 0
    for i in torch.randperm(len(sizes), generator=torch.Generator().manual_seed(0)).tolist():
        rows.append(i)
        total += sizes[i]
        if total >= args.batch_tokens:
            break
    c = ab.shared_prefix(model, t)
    print(f"{len(rows)} rows, {total} Y tokens, shared prefix {c} tokens; {args.threads} thread(s), fp32")

    real = ab.shared_prefix
    times, grads = {True: [], False: []}, {}
    for rep in range(args.reps):
        for share in (True, False):
            ab.shared_prefix = real if share else (lambda model, t, rows=None: 0)
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            ab._accumulate(model, t, sorted(rows), cfg, backward=True)
            times[share].append(time.perf_counter() - t0)
            grads[share] = [q.grad.clone() for q in lora_parameters(model)]
    ab.shared_prefix = real
    a, b = statistics.median(times[True]), statistics.median(times[False])
    diff = max(float((g - h).abs().max()) for g, h in zip(grads[True], grads[False]))
    scale = max(float(h.abs().max()) for h in grads[False])
    print(f"step forward + backward: shared prefix {a:.2f} s, prefix in every row {b:.2f} s (medians of "
          f"{args.reps}); ratio {a / b:.2f}")
    print(f"largest LoRA gradient difference {diff:.2e} (largest gradient {scale:.2e})")


if __name__ == "__main__":
    main()
