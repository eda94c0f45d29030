"""Token sampling with a KV cache: greedy, temperature, top-k, top-p (nucleus)."""
from typing import Iterator, Optional

import torch

from .model import Llama


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]               # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p                                # keep the first token always
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Llama, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, stop_ids=(),
             generator: Optional[torch.Generator] = None, prefill_chunk: int = 512) -> Iterator[int]:
    """Yield new token ids one by one (batch 1), stopping after a stop id (which is yielded) or
    max_new_tokens. The prompt is prefilled in chunks into a KV cache sized to fit."""
    device = model.embed.weight.device
    if not prompt_ids:
        raise ValueError("generate: the prompt is empty (give at least one token, e.g. BOS)")
    total = len(prompt_ids) + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's context of {model.cfg.max_seq_len} tokens")
    cache = model.new_cache(1, total)
    ids = torch.tensor([prompt_ids], device=device)
    for s in range(0, ids.shape[1], prefill_chunk):
        logits = model(ids[:, s:s + prefill_chunk], cache=cache)
    logits = logits[:, -1]
    stop = set(stop_ids)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        tok = int(nxt.item())
        yield tok
        if tok in stop:
            return
        logits = model(nxt.view(1, 1), cache=cache)[:, -1]


def greedy(model: Llama, prompt_ids: list[int], max_new_tokens: int, stop_ids=()) -> list[int]:
    """The one greedy-decoding helper: new token ids after `prompt_ids` (a stop id, if produced,
    is kept at the end)."""
    return list(generate(model, list(prompt_ids), max_new_tokens, 0.0, stop_ids=stop_ids))


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = False,
                  temperature: float = 0.0, **kw) -> str:
    """Convenience: prompt string -> completion string (stop token not included)."""
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    ids = tokenizer.encode(prompt, bos=tokenizer.add_bos)
    out = list(generate(model, ids, max_new_tokens, temperature, stop_ids=tokenizer.stop_ids, **kw))
    if out and out[-1] in tokenizer.stop_ids:
        out = out[:-1]
    return tokenizer.decode(out)
