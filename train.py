"""Train a Llama on plain text: from scratch (a SentencePiece tokenizer is trained on the data
first) or on top of an existing checkpoint, fully or with LoRA. One process, or many through
torchrun (DistributedDataParallel: gloo on CPU, NCCL on CUDA).

    python train.py --data corpus.txt --out runs/tiny                            # ~1M model
    python train.py --data ../shared/data/austen --preset small --out runs/austen --max-steps 2000
    python train.py --data notes/ --init default --lora --lora-rank 16 --out runs/notes-lora
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
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanoabsorber.checkpoint import fingerprint, load_model, save_checkpoint
from nanoabsorber.cli import RunConfig, format_duration, run, setup
from nanoabsorber.config import Parser, add_flags, build, print_config
from nanoabsorber.data import (TokenData, WindowLoader, cache_dir_for, check_data_files, list_data_files,
                               prepare_tokens, tokenizer_hash, train_sentencepiece, unigram_entropy)
from nanoabsorber.distributed import Procs, start_processes, under_torchrun
from nanoabsorber.errors import CheckpointError, UserError
from nanoabsorber.io import atomic_copy, atomic_write_text
from nanoabsorber.model import Llama
from nanoabsorber.tokenizer import ByteBPETokenizer, load_tokenizer
from nanoabsorber.train_utils import (STATE_FILE, TrainConfig, get_lr, load_optimizer_tensors,
                                      lora_merged, optimizer_tensors, param_groups, read_train_state,
                                      read_train_state_info, save_train_state, signature_diff, weights_sha256)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
RUN_SKIP = ("ckpt", "dtype")   # train's checkpoint is --init; its --dtype is an autocast dtype (TrainConfig)


def main(argv=None) -> int:
    cfg, run_cfg = parse_config(argv)           # a bad flag: one line, exit 2, before any work
    setup(run_cfg)                              # torch threads, attention path
    procs = start_processes(run_cfg.device)
    try:
        return train(cfg.resolved(procs.device), run_cfg, procs)
    finally:
        if procs.ddp and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig, run_cfg: RunConfig, procs: "Procs") -> int:
    if procs.master:
        print_config("train.py", cfg, argparse.Namespace(device=procs.device, attn=run_cfg.attn,
                                                         threads=run_cfg.threads))
    saved = check_output(cfg)                   # refuses to overwrite; writes nothing
    init_model, init_source = load_init(cfg)
    data = prepare_data(cfg, procs, init_source)
    model, base_fp = build_model(cfg, data, init_model, procs)
    signature = run_signature(cfg, data, model, base_fp)
    if saved is not None:
        check_signature(cfg, saved, signature)
    trainer = Trainer(cfg, procs, data, model, signature)
    start_step = trainer.restore() if saved is not None else 0
    trainer.open_output(start_step, resumed=saved is not None)   # the run is valid: write the folder
    trainer.loop(start_step)
    trainer.finish()
    return 0


# ----------------------------------------------------------------------------- configuration

def build_parser() -> Parser:
    p = Parser(prog="train.py", description=__doc__)
    add_flags(p, TrainConfig)
    add_flags(p, RunConfig, skip=RUN_SKIP, title="device and threads")
    return p


def parse_config(argv=None) -> tuple[TrainConfig, RunConfig]:
    """The validated settings; a bad value or combination is one argparse line and exit 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = build(parser, TrainConfig, args)
    run_cfg = build(parser, RunConfig, args, skip=RUN_SKIP)
    lora_flags = [a.split("=")[0] for a in argv if a.startswith("--lora-")]
    if lora_flags and not cfg.model.lora:
        parser.error(f"argument {lora_flags[0]}: LoRA settings need --lora (add --lora to train LoRA adapters)")
    world = world_size()
    if cfg.optim.grad_accum % world:
        parser.error(f"argument --grad-accum: {cfg.optim.grad_accum} is not a multiple of the {world} processes")
    return cfg, run_cfg


# ----------------------------------------------------------------------------- processes

def world_size() -> int:
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else 1


# ----------------------------------------------------------------------------- output folder, model source

def check_output(cfg: TrainConfig) -> dict | None:
    """The saved run's info with --resume (None for a new run); refuses an --out that holds a
    checkpoint without --resume. Writes nothing."""
    out = Path(cfg.data.out)
    state_path = out / STATE_FILE
    if cfg.log.resume:
        if not state_path.is_file():
            raise UserError(f"{out}: nothing to resume (no {STATE_FILE})")
        return read_train_state_info(state_path)
    if state_path.exists() or (out / "model.safetensors").exists():
        raise UserError(f"{out}: already holds a checkpoint; pass --resume to continue it or choose another --out")
    return None


def load_init(cfg: TrainConfig) -> tuple:
    """(model, tokenizer source) of --init: the source is its folder or its parsed GGUF reader;
    (None, None) when training from scratch."""
    if not cfg.model.init:
        return None, None
    path = cfg.model.init
    if path == "default":
        from nanoabsorber.default_model import default_model_dir

        path = default_model_dir()
    model, source = load_model(path, device="cpu", dtype=torch.float32)
    return model.train(), source


# ----------------------------------------------------------------------------- data

@dataclass
class Data:
    files: list
    cache: Path
    tok: object
    tok_src: object          # a tokenizer folder or file, or a parsed GGUF reader
    tok_hash: str
    tokens: TokenData
    unigram: float           # entropy of the validation tokens (nan without validation)


def tokenizer_source(cfg: TrainConfig, files: list, cache: Path, init_source, log):
    if cfg.log.resume:
        return Path(cfg.data.out)
    if init_source is not None:
        return init_source
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    return train_sentencepiece(files, cfg.data.vocab_size, cache, seed=cfg.system.seed, log=log)


def open_tokenizer(src) -> tuple:
    """(tokenizer, hash of what the output folder will hold, so that --resume finds the same one)."""
    if isinstance(src, Path):
        return load_tokenizer(src), tokenizer_hash(src)
    tok = ByteBPETokenizer.from_gguf(src)            # saved as tokenizer.json: hash that file's bytes
    text = json.dumps(tok.to_tokenizer_json(), ensure_ascii=False, indent=1).encode()
    return tok, hashlib.sha256(b".json\0" + text).hexdigest()[:16]


def prepare_data(cfg: TrainConfig, procs: Procs, init_source) -> Data:
    """Tokenizer, token file and the train/validation split. Rank 0 prepares first (tokenizer
    training, tokenization); the other ranks then find everything in the cache."""
    if procs.ddp and not procs.master:
        dist.barrier()
    files = list_data_files(cfg.data.data)
    check_data_files(files)
    cache = cache_dir_for(cfg.data.data, cfg.data.cache_dir)
    tok_src = tokenizer_source(cfg, files, cache, init_source, procs.log)
    tok, tok_hash = open_tokenizer(tok_src)
    token_file = prepare_tokens(files, tok, tok_hash, cache, log=procs.log)
    if procs.ddp and procs.master:
        dist.barrier()

    T, B, A, val_frac = cfg.model.seq_len, cfg.optim.batch_size, cfg.optim.grad_accum, cfg.data.val_frac
    tokens = TokenData(token_file.path, token_file.dtype, token_file.n_tokens, T, val_frac)
    if tokens.n_train_windows < B * A:
        raise UserError(f"{cfg.data.data}: {tokens.n_train_tokens:,} training tokens make {tokens.n_train_windows} "
                        f"sequences of {T + 1} tokens, fewer than one batch of {B * A} (--batch-size {B} x "
                        f"--grad-accum {A}); use more data or a smaller --batch-size / --seq-len")
    if val_frac > 0 and tokens.n_val_windows < 1:
        raise UserError(f"{cfg.data.data}: the validation split ({tokens.n_val_tokens:,} tokens) is shorter than one "
                        f"sequence of {T + 1}; raise --val-frac, lower --seq-len, or pass --val-frac 0")
    unigram = unigram_entropy(tokens.val_tokens(), tok.vocab_size) if val_frac > 0 else float("nan")
    return Data(files, cache, tok, tok_src, tok_hash, tokens, unigram)


# ----------------------------------------------------------------------------- model

def build_model(cfg: TrainConfig, data: Data, init_model, procs: Procs) -> tuple[Llama, str | None]:
    """The model to train, on its device, with LoRA applied if asked; and the fingerprint of the
    checkpoint it starts from (None from scratch)."""
    torch.manual_seed(cfg.system.seed)  # the same initial weights on every rank
    vocab = data.tok.vocab_size
    if init_model is not None:
        model = init_model
        if vocab > model.cfg.vocab_size:
            raise UserError(f"{cfg.model.init}: tokenizer has {vocab} tokens, the model only {model.cfg.vocab_size}")
        if cfg.model.seq_len > model.cfg.max_seq_len:
            procs.log(f"warning: --seq-len {cfg.model.seq_len} is longer than the model's max_seq_len "
                      f"{model.cfg.max_seq_len}")
    else:
        model = Llama(cfg.model.llama_config(vocab, bos_id=data.tok.bos_id, eos_id=data.tok.eos_id))
        model.init_weights(0.02)
    base_fp = fingerprint(model) if init_model is not None else None  # LoRA resumes need the base as is
    if cfg.model.lora:
        from nanoabsorber.lora import apply_lora

        apply_lora(model, cfg.lora)
    return model.to(procs.device).train(), base_fp


def run_signature(cfg: TrainConfig, data: Data, model: Llama, base_fp: str | None) -> dict:
    """What must match for --resume (a JSON round trip, so tuples compare as lists)."""
    root = Path(cfg.data.data)
    return json.loads(json.dumps({
        "model": model.cfg.to_dict(), "init": cfg.model.init, "base": base_fp,
        "lora": asdict(cfg.lora) if cfg.model.lora else None,
        "seq_len": cfg.model.seq_len, "batch_size": cfg.optim.batch_size, "grad_accum": cfg.optim.grad_accum,
        "seed": cfg.system.seed, "val_frac": cfg.data.val_frac, "tokenizer": data.tok_hash,
        "vocab_size": None if (cfg.model.init or cfg.data.tokenizer) else cfg.data.vocab_size,
        "data": [[str(f.relative_to(root)) if f != root else f.name, f.stat().st_size] for f in data.files],
    }))


def check_signature(cfg: TrainConfig, saved: dict, signature: dict) -> None:
    diff = signature_diff(saved["signature"], signature)
    if diff:
        raise UserError(f"{cfg.data.out}: cannot resume, this run's configuration differs from the saved one: "
                        + "; ".join(diff[:4]) + (f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""))


# ----------------------------------------------------------------------------- training

class Trainer:
    """The training run proper: optimizer, data order, the loop, evaluation and checkpoints."""

    def __init__(self, cfg: TrainConfig, procs: Procs, data: Data, model: Llama, signature: dict):
        self.cfg, self.procs, self.data, self.raw, self.signature = cfg, procs, data, model, signature
        self.out = Path(cfg.data.out)
        self.device = procs.device
        o = cfg.optim
        self.B, self.A, self.T = o.batch_size, o.grad_accum, cfg.model.seq_len
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        groups, self.names = param_groups(model, o.weight_decay)
        self.opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2))
        self.model = model
        if procs.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            cuda = self.device.startswith("cuda")
            self.model = DDP(model, device_ids=[torch.cuda.current_device()] if cuda else None)
        self.autocast = (torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)
                         if cfg.system.dtype == "bfloat16" else nullcontext())
        if self.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(cfg.system.seed + procs.rank)  # training randomness (LoRA dropout) differs per rank
        self.loader = WindowLoader(data.tokens.n_train_windows, self.B * self.A, cfg.system.seed)
        self.log_file = None
        self.val = float("nan")

    # ---- resume
    def restore(self) -> int:
        """Weights, optimizer, RNG and data position from train_state.safetensors; the step to start at."""
        path = self.out / STATE_FILE
        tensors, saved = read_train_state(path)
        rank, world = self.procs.rank, self.procs.world
        params = dict(self.raw.named_parameters())
        want = {f"param.{n}" for n in self.names}
        have = {k for k in tensors if k.startswith("param.")}
        if want != have:
            raise CheckpointError(path, f"parameters do not match this model ({sorted(want ^ have)[0]})")
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(tensors[f"param.{n}"])
        load_optimizer_tensors(self.opt, self.names, tensors)
        if saved["world_size"] == world:
            torch.set_rng_state(tensors[f"rng.torch.rank{rank}"])
            if self.device.startswith("cuda") and f"rng.cuda.rank{rank}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{rank}"])
        else:
            self.procs.log(f"warning: resuming {saved['world_size']}-process state with {world} processes: "
                           "RNG reseeded")
        pos, step = saved["data"], saved["step"]
        if pos["n_windows"] != self.data.tokens.n_train_windows:
            raise UserError(f"{self.out}: cannot resume, the data now make {self.data.tokens.n_train_windows} "
                            f"training sequences, the saved run had {pos['n_windows']}")
        if step >= self.cfg.optim.max_steps:
            raise UserError(f"{self.out}: already trained {step} steps; raise --max-steps to continue")
        self.loader = WindowLoader(self.loader.n, self.loader.bw, self.cfg.system.seed, pos["epoch"], pos["pos"])
        return step

    # ---- the output folder
    def open_output(self, start_step: int, resumed: bool) -> None:
        """Create --out: the tokenizer (new runs), log.jsonl (a resumed run keeps its rows up to
        the step it resumes from); print the run's size."""
        d, procs = self.data, self.procs
        if procs.master:
            self.out.mkdir(parents=True, exist_ok=True)
            if not resumed:
                write_tokenizer(self.out, d)
            log_path = self.out / "log.jsonl"
            kept = []
            if resumed and log_path.exists():
                rows = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()]
                kept = [json.dumps(r) for r in rows if r.get("step", 0) <= start_step and r.get("event") != "done"]
            atomic_write_text(log_path, "".join(ln + "\n" for ln in kept))
            self.log_file = open(log_path, "a")
        cfg = self.raw.cfg
        n_params, n_train = self.raw.num_params(), sum(p.numel() for p in self.trainable)
        procs.log(f"model: {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trainable), {cfg.n_layers} layers, "
                  f"dim {cfg.dim}, vocab {cfg.vocab_size}; data: {d.tokens.n_train_tokens:,} train / "
                  f"{d.tokens.n_val_tokens:,} val tokens; {self.B * self.A * self.T:,} tokens per step on "
                  f"{procs.world} process(es)")
        procs.log(f"unigram baseline: the validation tokens' entropy is {d.unigram:.4f} nats")

    def write_log(self, **row) -> None:
        if self.log_file is not None:
            self.log_file.write(json.dumps(row) + "\n")
            self.log_file.flush()

    # ---- the loop
    def loop(self, start_step: int) -> None:
        cfg, max_steps = self.cfg, self.cfg.optim.max_steps
        if start_step == 0 and cfg.data.val_frac > 0:
            self.validate(0)
        meter = Meter(self, start_step)
        for step in range(start_step, max_steps):
            t0 = time.perf_counter()
            lr, loss, gnorm = self.step(step)
            done = step + 1
            meter.update(done, t0, lr, loss, gnorm)
            if cfg.data.val_frac > 0 and ((cfg.log.eval_every and done % cfg.log.eval_every == 0) or done == max_steps):
                self.validate(done)
            if (cfg.log.save_every and done % cfg.log.save_every == 0) or done == max_steps:
                self.save(done)

    def step(self, step: int) -> tuple:
        """One optimizer step over this rank's share of the global batch: (lr, mean loss, grad norm)."""
        o, world, rank = self.cfg.optim, self.procs.world, self.procs.rank
        lr = get_lr(step, o.lr, o.min_lr, o.warmup_steps, o.decay_steps)
        for g in self.opt.param_groups:
            g["lr"] = lr
        windows = self.loader.next()
        accum, B = self.A // world, self.B
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            j = micro * world + rank  # this forward pass's share of the global batch
            x, y = self.data.tokens.batch(windows[j * B:(j + 1) * B], self.device)
            sync = self.model.no_sync() if self.procs.ddp and micro < accum - 1 else nullcontext()
            with sync:
                with self.autocast:
                    logits = self.model(x)
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
                (loss / accum).backward()
            total += loss.detach() / accum
        gnorm = torch.nn.utils.clip_grad_norm_(self.trainable, o.grad_clip) if o.grad_clip > 0 else None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return lr, total, gnorm

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.procs.ddp:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over --eval-batches batches (split over the ranks)."""
        raw, B, tokens = self.raw, self.B, self.data.tokens
        raw.eval()
        n = min(tokens.n_val_windows, self.cfg.log.eval_batches * B)
        mine = list(range(n))[self.procs.rank::self.procs.world]
        tot = torch.zeros(2, device=self.device, dtype=torch.float64)
        for i in range(0, len(mine), B):
            x, y = tokens.val_batch(mine[i:i + B], self.device)
            with self.autocast:
                logits = raw(x)
            tot[0] += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum").double()
            tot[1] += y.numel()
        raw.train()
        self.all_sum(tot)
        return (tot[0] / tot[1]).item()

    def validate(self, step: int) -> None:
        self.val = self.evaluate()
        unigram = self.data.unigram
        self.procs.log(f"step {step} | val loss {self.val:.4f} (unigram {unigram:.4f})")
        self.write_log(step=step, val_loss=self.val, unigram=unigram)

    # ---- checkpoints
    def gather_rng(self) -> dict:
        """Every rank's RNG states, gathered on all ranks (a collective: every rank calls it)."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.startswith("cuda"):
            rng["cuda"] = torch.cuda.get_rng_state()
        gathered = {}
        for kind, t in rng.items():
            parts = [t]
            if self.procs.ddp:
                parts = [torch.empty_like(t, device=self.device) for _ in range(self.procs.world)]
                dist.all_gather(parts, t.to(self.device))
            gathered.update({f"rng.{kind}.rank{r}": part.cpu() for r, part in enumerate(parts)})
        return gathered

    def save(self, step: int) -> None:
        """The checkpoint (LoRA merged in), the adapter (with LoRA) and train_state.safetensors."""
        rng = self.gather_rng()
        if not self.procs.master:
            return
        params = dict(self.raw.named_parameters())
        tensors = {f"param.{n}": params[n] for n in self.names}
        tensors.update(optimizer_tensors(self.opt, self.names))
        tensors.update(rng)
        with lora_merged(self.raw):
            save_checkpoint(self.raw, self.out, extra_metadata={"step": step})
        if self.cfg.model.lora:
            from nanoabsorber.lora import save_adapter

            save_adapter(self.raw, self.out / "adapter.safetensors", step=step, init=str(self.cfg.model.init))
        info = {"version": 1, "step": step, "data": self.loader.state(), "signature": self.signature,
                "config": self.raw.cfg.to_dict(), "world_size": self.procs.world, "args": asdict(self.cfg)}
        save_train_state(self.out / STATE_FILE, tensors, info)
        self.procs.log(f"saved {self.out} at step {step}")

    # ---- the end
    def finish(self) -> None:
        """Every rank prints the sha256 of its weights; rank 0 logs them all."""
        digest = weights_sha256(self.raw)
        hashes = [digest]
        if self.procs.ddp:
            mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=self.device)
            parts = [torch.empty_like(mine) for _ in range(self.procs.world)]
            dist.all_gather(parts, mine)
            hashes = [bytes(p.cpu().tolist()).hex() for p in parts]
        print(f"rank {self.procs.rank}: weights sha256 {digest}", file=sys.stderr, flush=True)
        unigram = self.data.unigram
        self.write_log(step=self.cfg.optim.max_steps, event="done", weights_sha256=hashes, val_loss=self.val,
                       unigram=unigram)
        if self.log_file is not None:
            self.log_file.close()
        self.procs.log(f"done: {self.out} (val loss {self.val:.4f} nats, unigram baseline {unigram:.4f} nats)")


class Meter:
    """The progress line: mean loss since the last line (over all ranks), tokens/s, elapsed, ETA."""

    def __init__(self, trainer: Trainer, start_step: int):
        self.tr, self.start_step = trainer, start_step
        self.tokens_per_step = trainer.B * trainer.A * trainer.T
        self.t_train, self.t_window, self.n = 0.0, 0.0, 0
        self.loss = torch.zeros((), device=trainer.device)

    def update(self, done: int, t0: float, lr: float, loss: torch.Tensor, gnorm) -> None:
        """Count a finished step (started at t0); every --log-every steps, print and log the line."""
        tr, max_steps = self.tr, self.tr.cfg.optim.max_steps
        self.loss += loss
        self.n += 1
        if done % tr.cfg.log.log_every and done != max_steps:
            self.t_window += time.perf_counter() - t0
            return
        mean_loss = (tr.all_sum(self.loss.clone()) / (self.n * tr.procs.world)).item()  # .item() syncs CUDA
        dt = time.perf_counter() - t0 + self.t_window
        self.t_train += dt
        tps = self.n * self.tokens_per_step / max(dt, 1e-9)
        eta = (max_steps - done) * self.t_train / (done - self.start_step)
        gn = gnorm.item() if gnorm is not None else float("nan")
        speed = f"{tps / 1e3:.1f}k tok/s" if tps >= 1000 else f"{tps:.1f} tok/s"
        tr.procs.log(f"step {done}/{max_steps} | loss {mean_loss:.4f} | lr {lr:.2e} | grad norm {gn:.3f} | {speed} | "
                     f"{format_duration(self.t_train)} elapsed, eta {format_duration(eta)}", flush=True)
        tr.write_log(step=done, loss=mean_loss, lr=lr, grad_norm=gn, tokens_per_s=tps,
                     tokens=done * self.tokens_per_step)
        self.t_window, self.n = 0.0, 0
        self.loss = torch.zeros((), device=tr.device)


def write_tokenizer(out: Path, data: Data) -> None:
    """Copy (or, from a GGUF, write) the tokenizer files into the output folder."""
    src = data.tok_src
    if not isinstance(src, Path):
        data.tok.save_tokenizer_json(out / "tokenizer.json")
    elif src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                atomic_copy(src / name, out / name)
    else:
        atomic_copy(src, out / ("tokenizer.json" if src.suffix == ".json" else "tokenizer.model"))
        for name in TOKENIZER_FILES[2:]:
            if (src.parent / name).is_file() and src.parent != data.cache:
                atomic_copy(src.parent / name, out / name)


if __name__ == "__main__":
    run(main)
