"""Generate text with a Llama checkpoint (default: SmolLM2-135M-Instruct), streaming tokens.

    python sample.py --chat --temperature 0 --prompt "What is the capital of France?"
    python sample.py --ckpt path/to/llama --prompt "Once upon a time" --top-p 0.9
    python sample.py --adapter doc.safetensors --chat --prompt "Who is Mira Okafor?"
    python sample.py --adapter a.safetensors --adapter b.safetensors --chat --prompt "..."   # both documents
"""
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from nanoabsorber import load
from nanoabsorber.cli import (Parser, RunConfig, UserError, add_flags, build, check_ckpt, print_config, read_text_file,
                              run, setup)
from nanoabsorber.config import in_range, non_negative, positive, setting
from nanoabsorber.sampling import generate


@dataclass
class SampleConfig:
    adapter: list[str] = setting(default_factory=list, help="LoRA adapter (.safetensors from absorb.py), merged "
                                 "into the weights; several are composed (their updates summed, "
                                 "nanoabsorber.lora.compose)")
    prompt: Optional[str] = setting(None, "prompt text (automatic: a short greeting)")
    prompt_file: Optional[str] = setting(None, "read the prompt from this file instead")
    chat: bool = setting(False, "wrap the prompt in the model's chat template")
    system: Optional[str] = setting(None, "system message for --chat")
    max_new_tokens: int = setting(128, "tokens to generate at most", check=positive)
    temperature: float = setting(0.7, "sampling temperature (0 = greedy)", check=non_negative)
    top_k: Optional[int] = setting(None, "keep the k most likely tokens", check=positive)
    top_p: Optional[float] = setting(None, "nucleus sampling threshold in (0, 1]", check=in_range(1e-6, 1.0))
    seed: int = setting(1337, "random seed")


def build_parser() -> Parser:
    p = Parser(prog="sample.py", description=__doc__)
    add_flags(p, RunConfig, title="model")
    add_flags(p, SampleConfig, title="sampling")
    return p


def main(argv=None):
    p = build_parser()
    ns = p.parse_args(argv)
    run_cfg, args = build(p, RunConfig, ns), build(p, SampleConfig, ns)
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    if args.prompt_file:
        prompt = read_text_file(args.prompt_file)
    else:
        prompt = args.prompt if args.prompt is not None else "Hello! Tell me a short story about a robot."
    check_ckpt(run_cfg)
    adapter = None
    if args.adapter:
        from nanoabsorber.lora import compose, read_adapter

        # a bad adapter file, or adapters that do not compose, fail here, before the model loads
        if len(args.adapter) == 1:
            read_adapter(args.adapter[0])
            adapter = args.adapter[0]
        else:
            adapter = compose(args.adapter)     # one adapter whose update is the sum of theirs
    print_config("sample.py", run_cfg, args)
    setup(run_cfg)
    torch.manual_seed(args.seed)

    t0 = time.time()
    model, tok = load(run_cfg.ckpt, device=run_cfg.device, dtype=run_cfg.dtype)
    if adapter is not None:
        from nanoabsorber.lora import load_adapter

        load_adapter(model, adapter, merge=True)
    print(f"loaded in {time.time() - t0:.2f}s ({model.num_params() / 1e6:.1f}M parameters)", file=sys.stderr)

    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        prompt = tok.apply_chat_template(msgs)
    ids = tok.encode(prompt, bos=tok.add_bos)
    gen = torch.Generator(device=run_cfg.device).manual_seed(args.seed)
    from nanoabsorber.tokenizer import StreamDecoder

    dec = StreamDecoder(tok)
    if not args.chat:
        print(prompt, end="", flush=True)
    n, t1 = 0, time.time()
    for t in generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                      stop_ids=tok.stop_ids, generator=gen):
        n += 1
        if t in tok.stop_ids:
            break
        print(dec.push(t), end="", flush=True)
    dt = time.time() - t1
    print(file=sys.stdout, flush=True)
    print(f"{n} tokens in {dt:.2f}s: {n / max(dt, 1e-9):.1f} tokens/s (prompt {len(ids)} tokens, incl. prefill)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    run(main)
