"""Scores: how well a method answers questions, and how much of a context's effect it keeps on
the text that follows the context.

Question answering (SQuAD-style normalisation):
    lenient   an accepted answer occurs in the prediction, case-insensitively
    strict    the prediction's first non-empty line equals an accepted answer (normalised)
    f1        SQuAD token F1 of the whole prediction, best over the accepted answers

Language modelling, for a held-out continuation Z of a context X:
    NLL_full  = per-token NLL of Z under the base model with X in its window (upper bound)
    NLL_none  = per-token NLL of Z with nothing before it
    NLL_meth  = per-token NLL of Z under a method (absorbed adapter, truncated window, ...)
    recovered = (NLL_none - NLL_meth) / (NLL_none - NLL_full)   (1 = all of X's effect kept)
    KL        = mean over Z's positions of KL(p_full || p_method) on next-token distributions
    recovered_kl = 1 - KL_meth / KL_none   (the paper's test: 1 = predicts Z exactly as the
                model with X does, 0 = no closer than with nothing before Z); over several
                segments, a ratio of segment means, with a bootstrap CI over segments
    layer distances: per layer l, mean |h_meth^l - h_full^l| / mean |h_full^l| on Z's positions

    logps = {"full": lm_logprobs(model, prefix, ctx, z), "none": lm_logprobs(model, prefix, [], z),
             "absorbed": lm_logprobs(absorbed_model, prefix, [], z)}
    continuation_scores(logps, z)   # {"full": {"nll", "kl", "recovered"}, "none": {...}, ...}
"""
import math
import random
import re
import string
from collections import Counter

import torch

# ------------------------------------------------------------------------------------------
# Question answering
# ------------------------------------------------------------------------------------------

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def first_line(s: str) -> str:
    for line in s.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(prediction: str, answers: list[str]) -> bool:
    """Strict: the first non-empty line of the prediction, normalised, equals an answer, normalised."""
    p = normalize_answer(first_line(prediction))
    return any(p == normalize_answer(a) for a in answers)


def lenient_match(prediction: str, answers: list[str]) -> bool:
    """Lenient: an accepted answer occurs in the prediction, case-insensitively."""
    p = prediction.lower()
    return any(a.lower() in p for a in answers)


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: list[str]) -> float:
    """SQuAD token F1 of the whole prediction, best over the accepted answers."""
    p = normalize_answer(prediction).split()
    return max(_f1(p, normalize_answer(a).split()) for a in answers)


def first_sentence(s: str) -> str:
    """The prediction's first sentence: up to the first '.', '!' or '?' followed by a space or the
    end, or the end of the first line (a decimal point or an initial does not end it)."""
    m = re.search(r"[.!?](?=\s|$)", first_line(s))
    return first_line(s)[:m.end()] if m else first_line(s)


def sentence_match(prediction: str, answers: list[str]) -> bool:
    """The first sentence answers: an accepted answer occurs in it (a recital of the document that
    names the answer later does not count)."""
    return lenient_match(first_sentence(prediction), answers)


def qa_scores(prediction: str, answers: list[str]) -> dict:
    """{"lenient", "sentence", "strict", "f1"} of one prediction (each in [0, 1])."""
    return {"lenient": float(lenient_match(prediction, answers)), "sentence": float(sentence_match(prediction, answers)),
            "strict": float(exact_match(prediction, answers)), "f1": token_f1(prediction, answers)}


def mean(xs) -> float:
    """Mean of the values that are not None or NaN; NaN when there are none."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else math.nan


# ------------------------------------------------------------------------------------------
# Language modelling
# ------------------------------------------------------------------------------------------

@torch.no_grad()
def target_logprobs(model, prefix: list[int], context: list[int], target: list[int], chunk: int = 512) -> torch.Tensor:
    """log p(target_t | prefix, context, target_<t) for every t: (len(target), V) fp32 on CPU.
    The first target token is predicted from the last prefix/context token; with no prefix and
    no context it has no prediction and is skipped (the result then has len(target) - 1 rows)."""
    dev = model.embed.weight.device
    seq = list(prefix) + list(context) + list(target)
    start = len(prefix) + len(context)             # index of target[0] in seq
    cache = model.new_cache(1, len(seq))
    rows = []
    for s in range(0, len(seq), chunk):
        e = min(s + chunk, len(seq))
        logits = model(torch.tensor([seq[s:e]], device=dev), cache=cache)[0]   # (e-s, V)
        # logits at position i predict seq[i+1]; keep i in [start-1, len(seq)-2]
        lo, hi = max(s, start - 1), min(e, len(seq) - 1)
        if lo < hi:
            rows.append(torch.log_softmax(logits[lo - s:hi - s].float(), -1).cpu())
    return torch.cat(rows, 0)


def lm_logprobs(model, prefix: list[int], context: list[int], target: list[int]) -> torch.Tensor:
    """(len(target) - 1, V) log-probabilities of target[1:], whatever the context (target[0] is
    skipped for every method, since with no context and no prefix it has no prediction), so that
    every method is scored on the same tokens."""
    logp = target_logprobs(model, prefix, context, target)
    return logp[-(len(target) - 1):]


def token_nlls(logp: torch.Tensor, target: list[int]) -> torch.Tensor:
    """Per-token NLL (nats) of the last len(logp) target tokens: a (len(logp),) tensor."""
    tgt = torch.tensor(list(target[len(target) - logp.shape[0]:]))
    return -logp.gather(1, tgt[:, None])[:, 0]


def token_kls(logp_ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(ref || other) of two (N, V) log-probability tensors, aligned at the end
    (the longer one's first rows are dropped)."""
    n = min(logp_ref.shape[0], logp.shape[0])
    a, b = logp_ref[logp_ref.shape[0] - n:], logp[logp.shape[0] - n:]
    return (a.exp() * (a - b)).sum(-1)


def nll(logp: torch.Tensor, target: list[int]) -> float:
    """Mean NLL (nats/token) of the last len(logp) target tokens."""
    return float(token_nlls(logp, target).mean())


def kl(logp_ref: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean over positions of KL(ref || other) (aligned at the end)."""
    return float(token_kls(logp_ref, logp).mean())


def recovered(nll_none: float, nll_full: float, nll_method: float) -> float:
    """(NLL_none - NLL_method) / (NLL_none - NLL_full): 1 = all of the context's effect kept,
    0 = none of it, negative = worse than no context; NaN when the context made no difference."""
    gap = nll_none - nll_full
    return (nll_none - nll_method) / gap if abs(gap) > 1e-9 else math.nan


def recovered_kl(kl_none: float, kl_method: float) -> float:
    """1 - KL_method / KL_none: the share of the gap to the full-context model closed; NaN when
    the context made no difference (KL_none = 0)."""
    return 1 - kl_method / kl_none if kl_none > 1e-12 else math.nan


def bootstrap_ci(rows: list, stat, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of stat(rows) resampling the rows (segments) with
    replacement; (nan, nan) for fewer than 2 rows. Draws whose statistic is NaN are dropped."""
    if len(rows) < 2:
        return math.nan, math.nan
    g = random.Random(seed)
    vals = sorted(v for v in (stat([rows[g.randrange(len(rows))] for _ in rows]) for _ in range(n_boot))
                  if not math.isnan(v))
    if not vals:
        return math.nan, math.nan
    lo = vals[int(math.floor((1 - level) / 2 * (len(vals) - 1)))]
    hi = vals[int(math.ceil((1 + level) / 2 * (len(vals) - 1)))]
    return lo, hi


@torch.no_grad()
def target_hidden(model, prefix: list[int], context: list[int], target: list[int]) -> torch.Tensor:
    """(L+1, len(target), D) fp32 hidden states h^0..h^L at the target positions with `context`
    in the window (the states the paper's test compares)."""
    dev = model.embed.weight.device
    _, hs = model(torch.tensor([list(prefix) + list(context) + list(target)], device=dev), hidden=True, logits=False)
    return torch.stack([h[0, -len(target):] for h in hs]).float().cpu()


def layer_distances(h_ref: torch.Tensor, h: torch.Tensor) -> list[float]:
    """Per layer: mean |h - h_ref| / mean |h_ref| over positions and features (relative L1) of two
    (L+1, N, D) stacks."""
    return ((h - h_ref).abs().mean((1, 2)) / h_ref.abs().mean((1, 2)).clamp_min(1e-12)).tolist()


def continuation_scores(logps: dict, target: list[int], full: str = "full", none: str = "none") -> dict:
    """Scores of a held-out continuation `target` per method, from per-method log-probabilities
    (lm_logprobs or target_logprobs of each method; aligned at the end, so every method is scored
    on the same last tokens): {name: {"nll", "kl", "recovered"}}. logps[full] (the context in
    the window) is KL's reference and, with logps[none] (no context), recovered's."""
    n = min(v.shape[0] for v in logps.values())
    z = list(target[len(target) - n:])
    nlls = {k: nll(v[v.shape[0] - n:], z) for k, v in logps.items()}
    ref = logps[full][logps[full].shape[0] - n:]
    return {k: {"nll": nlls[k], "kl": kl(ref, v[v.shape[0] - n:]),
                "recovered": recovered(nlls[none], nlls[full], nlls[k])} for k, v in logps.items()}


def bucket_means(values: list[float], n_buckets: int) -> tuple[list[float], list[int]]:
    """Means of `values` over n_buckets contiguous, near-equal buckets; also the bucket starts."""
    n = len(values)
    n_buckets = max(1, min(n_buckets, n))
    edges = [round(i * n / n_buckets) for i in range(n_buckets + 1)]
    return [sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:])], edges[:-1]


def nll_by_position(per_token: dict, n_buckets: int) -> dict:
    """NLL against position after the context: per method, the per-token NLL averaged over
    segments, then over n_buckets contiguous buckets. Positions count target tokens after the
    context (1 = the second evaluated token, the first one every method predicts)."""
    out = {"nll": {}, "bucket_starts": [], "bucket_centers": []}
    for name, curves in per_token.items():
        curve = torch.stack(curves).mean(0).tolist()
        out["nll"][name], starts = bucket_means(curve, n_buckets)
        ends = starts[1:] + [len(curve)]
        out["bucket_starts"] = [s + 1 for s in starts]
        out["bucket_centers"] = [(s + e - 1) / 2 + 1 for s, e in zip(starts, ends)]
    return out
