"""Generate text with a Llama checkpoint (default: SmolLM2-135M-Instruct), streaming tokens.

    python sample.py --chat --temperature 0 --prompt "What is the capital of France?"
    python sample.py --ckpt path/to/llama --prompt "Once upon a time" --top-p 0.9
    python sample.py --adapter doc.safetensors --chat --prompt "Who is Mira Okafor?"
"""
import argparse
import sys
import time

import torch

from nanoabsorber import DTYPES, load
from nanoabsorber.attention import set_attention_impl
from nanoabsorber.cli import UserError, add_model_args, print_config, run
from nanoabsorber.sampling import generate


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--adapter", default=None, help="LoRA adapter (.safetensors from absorb.py), merged into the weights")
    p.add_argument("--prompt", default=None, help="prompt text (default: a short greeting)")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this file instead")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    args = p.parse_args()
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    if args.prompt_file:
        try:
            prompt = open(args.prompt_file, encoding="utf-8").read()
        except UnicodeDecodeError:
            raise UserError(f"{args.prompt_file}: not UTF-8 text") from None
    else:
        prompt = args.prompt if args.prompt is not None else "Hello! Tell me a short story about a robot."
    print_config("sample.py", args)
    set_attention_impl(args.attn)
    torch.manual_seed(args.seed)

    t0 = time.time()
    model, tok = load(args.ckpt, device=args.device, dtype=DTYPES[args.dtype])
    if args.adapter:
        from nanoabsorber.lora import load_adapter

        load_adapter(model, args.adapter, merge=True)
    print(f"loaded in {time.time() - t0:.2f}s ({model.num_params() / 1e6:.1f}M parameters)", file=sys.stderr)

    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        prompt = tok.apply_chat_template(msgs)
    ids = tok.encode(prompt, bos=tok.add_bos)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
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
