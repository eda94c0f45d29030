"""Metrics of how much of a context's effect a method keeps, on text that follows the context.

For a held-out continuation Z of a context X:
    NLL_full  = per-token NLL of Z under the base model with X in its window (upper bound)
    NLL_none  = per-token NLL of Z with nothing before it
    NLL_meth  = per-token NLL of Z under a method (absorbed adapter, truncated window, ...)
    recovered = (NLL_none - NLL_meth) / (NLL_none - NLL_full)   (1 = all of X's effect kept)
    KL        = mean over Z's positions of KL(p_full || p_method) on next-token distributions
"""
import math

import torch


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


def nll(logp: torch.Tensor, target: list[int]) -> float:
    """Mean NLL (nats/token) of the last len(logp) target tokens."""
    tgt = torch.tensor(target[len(target) - logp.shape[0]:])
    return float(-logp.gather(1, tgt[:, None]).mean())


def kl(logp_ref: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean over positions of KL(ref || other), both (N, V) log-probabilities (aligned at the end)."""
    n = min(logp_ref.shape[0], logp.shape[0])
    a, b = logp_ref[-n:], logp[-n:]
    return float((a.exp() * (a - b)).sum(-1).mean())


def recovered(nll_none: float, nll_full: float, nll_method: float) -> float:
    gap = nll_none - nll_full
    return (nll_none - nll_method) / gap if abs(gap) > 1e-9 else math.nan
