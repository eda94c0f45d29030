"""Train a Llama on plain text: from scratch (a SentencePiece tokenizer is trained on the data
first) or on top of an existing checkpoint, fully or with LoRA. One process, or many through
torchrun (DistributedDataParallel: gloo on CPU, NCCL on CUDA).

    python train.py --data corpus.txt --out runs/tiny                            # ~1M model
    python train.py --data ../shared/data/austen --preset small --out runs/austen --max-steps 2000
    python train.py --data notes/ --init default --lora-rank 16 --out runs/notes-lora
    python train.py --data corpus.txt --out runs/tiny --resume                    # continue a run
    torchrun --nproc_per_node 2 train.py --data corpus.txt --out runs/ddp --grad-accum 2

The output folder holds model.safetensors + config.json + the tokenizer (nanoabsorber.load and
sample.py --ckpt read it as it is), train_state.safetensors (optimizer, data position and RNG,
for --resume), log.jsonl (one JSON object per progress / validation line) and, with LoRA,
adapter.safetensors. Batches: --batch-size sequences per forward pass and process, --grad-accum
forward passes per optimizer step in all (split over the processes), so a step sees
batch-size x grad-accum x seq-len tokens whatever the number of processes.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanoabsorber.checkpoint import CheckpointError, atomic_write_text, fingerprint, load_model
from nanoabsorber.cli import UserError, print_config, run
from nanoabsorber.data import (TokenData, WindowLoader, cache_dir_for, check_data_files, list_data_files,
                               prepare_tokens, tokenizer_hash, train_sentencepiece, unigram_entropy)
from nanoabsorber.model import Llama
from nanoabsorber.tokenizer import load_tokenizer
from nanoabsorber.train_utils import (PRESETS, STATE_FILE, format_duration, get_lr, load_optimizer_tensors,
                                      model_config, optimizer_tensors, param_groups, read_train_state,
                                      read_train_state_info, save_model, save_train_state, signature_diff,
                                      weights_sha256)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="a UTF-8 text file, or a folder of them (hidden files skipped)")
    g.add_argument("--out", required=True, help="output folder (checkpoint, tokenizer, training state, log)")
    g.add_argument("--cache-dir", default=None,
                   help="where tokenized data is cached (default: beside the data, or the user cache if read-only)")
    g.add_argument("--val-frac", type=float, default=0.05, help="fraction of tokens (at the end) held out for validation")
    g.add_argument("--tokenizer", default=None, help="use this tokenizer (folder or file) instead of training one")
    g.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the SentencePiece tokenizer trained on the data")
    g = p.add_argument_group("model")
    g.add_argument("--init", default=None, help="continue training this checkpoint ('default' = the default model)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="model size: tiny ~1M, small ~10M, medium ~40M parameters (default tiny)")
    g.add_argument("--n-layers", type=int, default=None, help="transformer blocks (overrides the preset)")
    g.add_argument("--dim", type=int, default=None, help="model width (overrides the preset)")
    g.add_argument("--n-heads", type=int, default=None, help="attention heads (overrides the preset)")
    g.add_argument("--n-kv-heads", type=int, default=None, help="key/value heads for grouped-query attention (default n-heads)")
    g.add_argument("--hidden-dim", type=int, default=None, help="MLP width (default 8/3 dim, rounded up to 32)")
    g.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="share the input embedding and the output head")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    g = p.add_argument_group("LoRA (with --init)")
    g.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank instead of all weights (0 = full)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 x rank)")
    g.add_argument("--lora-targets", default="all", help="comma list of q,k,v,o,gate,up,down or 'all'")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass, per process")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="forward passes per optimizer step, in all (a multiple of the number of processes)")
    g.add_argument("--max-steps", type=int, default=1000, help="stop after this many optimizer steps")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 1e-3 from scratch or with LoRA, 1e-4 full fine-tuning)")
    g.add_argument("--min-lr", type=float, default=None, help="learning rate at the end of the cosine (default lr/10)")
    g.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps")
    g.add_argument("--decay-steps", type=int, default=None,
                   help="step where the cosine reaches min-lr (default max-steps; keep it when extending a run)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-every", type=int, default=100, help="validation loss every this many steps (0 = only at the end)")
    g.add_argument("--eval-batches", type=int, default=20, help="validation batches (of --batch-size) per evaluation")
    g.add_argument("--log-every", type=int, default=10, help="progress line every this many steps")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every this many steps (0 = only at the end)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="autocast dtype (default bfloat16 on CUDA, float32 on CPU); weights stay float32")
    g.add_argument("--seed", type=int, default=1337, help="random seed (model init, data order)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is best on busy shared cores)")
    return p.parse_args(argv)


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # ------------------------------------------------------------------ processes and devices
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, local_rank, world = 0, 0, 1
    device = args.device
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    try:
        return train(args, ddp, rank, world, device, master, log)
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


def train(args, ddp, rank, world, device, master, log):
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda, but CUDA is not available")
    args.dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    lora = args.lora_rank > 0
    args.lr = args.lr or (1e-4 if args.init and not lora else 1e-3)
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    args.decay_steps = args.decay_steps or args.max_steps
    args.lora_alpha = args.lora_alpha or 2.0 * args.lora_rank
    shape_flags = {"--preset": args.preset, "--n-layers": args.n_layers, "--dim": args.dim, "--n-heads": args.n_heads,
                   "--n-kv-heads": args.n_kv_heads, "--hidden-dim": args.hidden_dim}
    if args.init and any(v is not None for v in shape_flags.values()):
        raise UserError(f"{next(k for k, v in shape_flags.items() if v is not None)} cannot be combined with "
                        "--init (the model's shape comes from the checkpoint)")
    if args.init and args.tokenizer:
        raise UserError("--tokenizer cannot be combined with --init (the checkpoint's tokenizer is kept)")
    if lora and not args.init:
        raise UserError("--lora-rank needs --init (LoRA adapts an existing model)")
    for flag in ("batch_size", "grad_accum", "max_steps", "seq_len", "log_every", "eval_batches"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive")
    if args.grad_accum % world:
        raise UserError(f"--grad-accum {args.grad_accum} is not a multiple of the {world} processes")
    if not 0 <= args.val_frac < 1:
        raise UserError("--val-frac must be in [0, 1)")
    if master:
        print_config("train.py", args)

    # ------------------------------------------------------------------ output folder: check, write nothing yet
    out = Path(args.out)
    state_path = out / STATE_FILE
    saved = None
    if args.resume:
        if not state_path.is_file():
            raise UserError(f"{out}: nothing to resume (no {STATE_FILE})")
        saved = read_train_state_info(state_path)
    elif state_path.exists() or (out / "model.safetensors").exists():
        raise UserError(f"{out}: already holds a checkpoint; pass --resume to continue it or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")

    # ------------------------------------------------------------------ model source and tokenizer
    init_model, init_folder = None, None
    if args.init:
        init_path = args.init
        if args.init == "default":
            from nanoabsorber.default_model import default_model_dir

            init_path = default_model_dir()
        init_model, init_folder = load_model(init_path, device="cpu", dtype=torch.float32)
        init_model.train()

    # data preparation (tokenizer training, tokenization) runs on rank 0 first; the others then hit the cache
    if ddp and not master:
        dist.barrier()
    files = list_data_files(args.data)
    check_data_files(files)
    cache = cache_dir_for(args.data, args.cache_dir)
    if args.resume:
        tok_src = out
    elif args.init:
        tok_src = Path(init_folder) if Path(init_path).suffix != ".gguf" else Path(init_path)
    elif args.tokenizer:
        tok_src = Path(args.tokenizer)
    else:
        tok_src = train_sentencepiece(files, args.vocab_size, cache, seed=args.seed, log=log)
    if tok_src.suffix == ".gguf":
        from nanoabsorber.tokenizer import ByteBPETokenizer

        tok = ByteBPETokenizer.from_gguf(tok_src)
        # hash what the output folder will hold (tokenizer.json), so that --resume finds the same tokenizer
        text = json.dumps(tok.to_tokenizer_json(), ensure_ascii=False, indent=1).encode()
        tok_hash = hashlib.sha256(b".json\0" + text).hexdigest()[:16]
    else:
        tok = load_tokenizer(tok_src)
        tok_hash = tokenizer_hash(tok_src)
    tokens = prepare_tokens(files, tok, tok_hash, cache, log=log)
    if ddp and master:
        dist.barrier()

    T, B, A = args.seq_len, args.batch_size, args.grad_accum
    data = TokenData(tokens.path, tokens.dtype, tokens.n_tokens, T, args.val_frac)
    if data.n_train_windows < B * A:
        raise UserError(f"{args.data}: {data.n_train_tokens:,} training tokens make {data.n_train_windows} sequences of "
                        f"{T + 1} tokens, fewer than one batch of {B * A} (--batch-size {B} x --grad-accum {A}); "
                        "use more data or a smaller --batch-size / --seq-len")
    if args.val_frac > 0 and data.n_val_windows < 1:
        raise UserError(f"{args.data}: the validation split ({data.n_val_tokens:,} tokens) is shorter than one sequence "
                        f"of {T + 1}; raise --val-frac, lower --seq-len, or pass --val-frac 0")
    unigram = unigram_entropy(data.val_tokens(), tok.vocab_size) if args.val_frac > 0 else float("nan")

    # ------------------------------------------------------------------ model
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if init_model is not None:
        model = init_model
        if tok.vocab_size > model.cfg.vocab_size:
            raise UserError(f"{args.init}: tokenizer has {tok.vocab_size} tokens, the model only {model.cfg.vocab_size}")
        if T > model.cfg.max_seq_len:
            log(f"warning: --seq-len {T} is longer than the model's max_seq_len {model.cfg.max_seq_len}")
    else:
        preset = PRESETS[args.preset or "tiny"]
        try:
            cfg = model_config(vocab_size=tok.vocab_size, seq_len=T, dim=args.dim or preset["dim"],
                               n_layers=args.n_layers or preset["n_layers"], n_heads=args.n_heads or preset["n_heads"],
                               n_kv_heads=args.n_kv_heads, hidden_dim=args.hidden_dim,
                               tie_embeddings=args.tie_embeddings, bos_id=tok.bos_id, eos_id=tok.eos_id)
        except ValueError as e:
            raise UserError(f"model shape: {e}") from None
        model = Llama(cfg)
        model.init_weights(0.02)
    cfg = model.cfg
    base_fp = fingerprint(model) if args.init else None  # the checkpoint we start from (LoRA resumes need it as is)
    if lora:
        from nanoabsorber.lora import apply_lora, parse_targets

        try:
            targets = parse_targets(args.lora_targets)
        except ValueError as e:
            raise UserError(str(e)) from None
        apply_lora(model, targets, args.lora_rank, args.lora_alpha, args.lora_dropout)
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]

    # what must match for --resume (JSON round trip so tuples compare as lists)
    signature = json.loads(json.dumps({
        "model": cfg.to_dict(), "init": str(args.init) if args.init else None, "base": base_fp,
        "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": args.lora_targets,
                 "dropout": args.lora_dropout} if lora else None,
        "seq_len": T, "batch_size": B, "grad_accum": A, "seed": args.seed, "val_frac": args.val_frac,
        "tokenizer": tok_hash, "vocab_size": None if (args.init or args.tokenizer) else args.vocab_size,
        "data": [[str(f.relative_to(args.data)) if f != Path(args.data) else f.name, f.stat().st_size] for f in files],
    }))
    if saved is not None:
        diff = signature_diff(saved["signature"], signature)
        if diff:
            raise UserError(f"{out}: cannot resume, this run's configuration differs from the saved one: "
                            + "; ".join(diff[:4]) + (f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""))

    groups, names = param_groups(model, args.weight_decay)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2))
    start_step, pos = 0, {"epoch": 0, "pos": 0}
    torch.manual_seed(args.seed + rank)  # training randomness (LoRA dropout) differs per rank
    if saved is not None:
        tensors, saved = read_train_state(state_path)
        params = dict(model.named_parameters())
        want = {f"param.{n}" for n in names}
        have = {k for k in tensors if k.startswith("param.")}
        if want != have:
            raise CheckpointError(state_path, f"parameters do not match this model ({sorted(want ^ have)[0]})")
        with torch.no_grad():
            for n in names:
                params[n].copy_(tensors[f"param.{n}"])
        load_optimizer_tensors(opt, names, tensors)
        start_step, pos = saved["step"], saved["data"]
        if saved["world_size"] == world:
            torch.set_rng_state(tensors[f"rng.torch.rank{rank}"])
            if device.startswith("cuda") and f"rng.cuda.rank{rank}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{rank}"])
        else:
            log(f"warning: resuming {saved['world_size']}-process state with {world} processes: RNG reseeded")
        if pos["n_windows"] != data.n_train_windows:
            raise UserError(f"{out}: cannot resume, the data now make {data.n_train_windows} training sequences, "
                            f"the saved run had {pos['n_windows']}")
        if start_step >= args.max_steps:
            raise UserError(f"{out}: already trained {start_step} steps; raise --max-steps to continue")
    loader = WindowLoader(data.n_train_windows, B * A, args.seed, pos["epoch"], pos["pos"])

    # ------------------------------------------------------------------ the run is valid: write the folder
    if master:
        out.mkdir(parents=True, exist_ok=True)
        if saved is None:
            if tok_src.suffix == ".gguf":
                tok.save_tokenizer_json(out / "tokenizer.json")
            elif tok_src.is_dir():
                for name in TOKENIZER_FILES:
                    if (tok_src / name).is_file():
                        copy_atomic(tok_src / name, out / name)
            else:
                copy_atomic(tok_src, out / ("tokenizer.json" if tok_src.suffix == ".json" else "tokenizer.model"))
                for name in TOKENIZER_FILES[2:]:
                    if (tok_src.parent / name).is_file() and tok_src.parent != cache:
                        copy_atomic(tok_src.parent / name, out / name)
        log_path = out / "log.jsonl"
        kept = []
        if saved is not None and log_path.exists():
            rows = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()]
            kept = [json.dumps(r) for r in rows if r.get("step", 0) <= start_step and r.get("event") != "done"]
        atomic_write_text(log_path, "".join(ln + "\n" for ln in kept))
        log_file = open(log_path, "a")
    n_params, n_train = model.num_params(), sum(p.numel() for p in trainable)
    log(f"model: {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trainable), {cfg.n_layers} layers, dim {cfg.dim}, "
        f"vocab {cfg.vocab_size}; data: {data.n_train_tokens:,} train / {data.n_val_tokens:,} val tokens; "
        f"{B * A * T:,} tokens per step on {world} process(es)")
    log(f"unigram baseline: the validation tokens' entropy is {unigram:.4f} nats")

    def write_log(**row):
        if master:
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()

    # ------------------------------------------------------------------ training
    raw = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(raw, device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None)
    autocast = (torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
                if args.dtype == "bfloat16" else nullcontext())
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    accum = A // world
    V = cfg.vocab_size

    def all_sum(t):
        if ddp:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    @torch.no_grad()
    def evaluate():
        raw.eval()
        n = min(data.n_val_windows, args.eval_batches * B)
        mine = list(range(n))[rank::world]
        tot = torch.zeros(2, device=device, dtype=torch.float64)
        for i in range(0, len(mine), B):
            x, y = data.val_batch(mine[i:i + B], device)
            with autocast:
                logits = raw(x)
            tot[0] += F.cross_entropy(logits.float().view(-1, V), y.reshape(-1), reduction="sum").double()
            tot[1] += y.numel()
        raw.train()
        all_sum(tot)
        return (tot[0] / tot[1]).item()

    def save(step):
        rng = {"torch": torch.get_rng_state()}
        if device.startswith("cuda"):
            rng["cuda"] = torch.cuda.get_rng_state()
        gathered = {}
        for kind, t in rng.items():  # every rank's RNG state, gathered on all ranks (a collective)
            parts = [t]
            if ddp:
                parts = [torch.empty_like(t, device=device) for _ in range(world)]
                dist.all_gather(parts, t.to(device))
            gathered.update({f"rng.{kind}.rank{r}": part.cpu() for r, part in enumerate(parts)})
        if not master:
            return
        params = dict(raw.named_parameters())
        tensors = {f"param.{n}": params[n] for n in names}
        tensors.update(optimizer_tensors(opt, names))
        tensors.update(gathered)
        meta = {"step": step}
        save_model(raw, out, extra_metadata=meta)
        if lora:
            from nanoabsorber.lora import save_adapter

            save_adapter(raw, out / "adapter.safetensors", step=step, init=str(args.init))
        info = {"version": 1, "step": step, "data": loader.state(), "signature": signature, "config": cfg.to_dict(),
                "world_size": world, "args": vars(args)}
        save_train_state(state_path, tensors, info)
        log(f"saved {out} at step {step}")

    if saved is None and args.val_frac > 0:
        val = evaluate()
        log(f"step 0 | val loss {val:.4f} (unigram {unigram:.4f})")
        write_log(step=0, val_loss=val, unigram=unigram)
    tokens_per_step = B * A * T
    t_train, t_window, n_window, loss_window = 0.0, 0.0, 0, torch.zeros((), device=device)
    val = float("nan")
    for step in range(start_step, args.max_steps):
        t0 = time.perf_counter()
        lr = get_lr(step, args.lr, args.min_lr, args.warmup_steps, args.decay_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        windows = loader.next()
        for micro in range(accum):
            j = micro * world + rank  # this forward pass's share of the global batch
            x, y = data.batch(windows[j * B:(j + 1) * B], device)
            sync = model.no_sync() if ddp and micro < accum - 1 else nullcontext()
            with sync:
                with autocast:
                    logits = model(x)
                loss = F.cross_entropy(logits.float().view(-1, V), y.reshape(-1))
                (loss / accum).backward()
            loss_window += loss.detach() / accum
        gnorm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip) if args.grad_clip > 0 else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        n_window += 1
        done = step + 1
        if done % args.log_every == 0 or done == args.max_steps:
            mean_loss = (all_sum(loss_window.clone()) / (n_window * world)).item()  # .item() syncs CUDA
            dt = time.perf_counter() - t0 + t_window
            t_train, t_window = t_train + dt, 0.0
            tps = n_window * tokens_per_step / max(dt, 1e-9)
            eta = (args.max_steps - done) * t_train / (done - start_step)
            gn = gnorm.item() if gnorm is not None else float("nan")
            speed = f"{tps / 1e3:.1f}k tok/s" if tps >= 1000 else f"{tps:.1f} tok/s"
            log(f"step {done}/{args.max_steps} | loss {mean_loss:.4f} | lr {lr:.2e} | grad norm {gn:.3f} | {speed} | "
                f"{format_duration(t_train)} elapsed, eta {format_duration(eta)}", flush=True)
            write_log(step=done, loss=mean_loss, lr=lr, grad_norm=gn, tokens_per_s=tps, tokens=done * tokens_per_step)
            n_window, loss_window = 0, torch.zeros((), device=device)
        else:
            t_window += time.perf_counter() - t0
        if args.val_frac > 0 and ((args.eval_every and done % args.eval_every == 0) or done == args.max_steps):
            val = evaluate()
            log(f"step {done} | val loss {val:.4f} (unigram {unigram:.4f})")
            write_log(step=done, val_loss=val, unigram=unigram)
        if (args.save_every and done % args.save_every == 0) or done == args.max_steps:
            save(done)

    # ------------------------------------------------------------------ the end: every rank's weights hash
    digest = weights_sha256(raw)
    hashes = [digest]
    if ddp:
        mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=device)
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
        hashes = [bytes(p.cpu().tolist()).hex() for p in parts]
    print(f"rank {rank}: weights sha256 {digest}", file=sys.stderr, flush=True)
    write_log(step=args.max_steps, event="done", weights_sha256=hashes, val_loss=val, unigram=unigram)
    if master:
        log_file.close()
        log(f"done: {out} (val loss {val:.4f} nats, unigram baseline {unigram:.4f} nats)")
    return 0


if __name__ == "__main__":
    run(main)
