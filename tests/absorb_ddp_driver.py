"""Absorb a text the way absorb.py does under torchrun (tests/test_distributed.py): join the
process group if started by torchrun, load, seed, absorb_text, rank 0 writes the adapter.

    python tests/absorb_ddp_driver.py CKPT TEXT OUT.safetensors [AbsorbConfig flags]
    torchrun --nproc_per_node 2 tests/absorb_ddp_driver.py CKPT TEXT OUT.safetensors ...

Every rank also writes OUT.rank<R>.json: its rows per step (the shard it computed) and losses;
rank 0 writes OUT.grad0.safetensors: the first step's all-reduced LoRA gradient."""
import json
import sys
from pathlib import Path

import torch

from nanoabsorber import distributed, load
from nanoabsorber.absorber import AbsorbConfig, absorb_text
from nanoabsorber.config import Parser, add_flags, build
from nanoabsorber.lora import save_adapter


def main():
    ckpt, text, out = sys.argv[1:4]
    p = Parser(prog="absorb_ddp_driver")
    add_flags(p, AbsorbConfig)
    cfg = build(p, AbsorbConfig, p.parse_args(sys.argv[4:]))
    torch.set_num_threads(1)
    procs = distributed.start_processes("cpu")
    shards, real_shard = [], distributed.shard

    def counting_shard(rows, weights):
        mine = real_shard(rows, weights)
        shards.append({"rows": list(rows), "mine": mine})
        return mine

    distributed.shard = counting_shard
    grads, real_reduce = [], distributed.all_reduce_grads_

    def recording_reduce(params):
        real_reduce(params)
        if not grads:  # the first step's (all-reduced) gradient
            grads.extend(p.grad.detach().clone() for p in params)

    distributed.all_reduce_grads_ = recording_reduce
    torch.manual_seed(cfg.seed)
    model, tok = load(ckpt)
    res = absorb_text(model, tok, Path(text).read_text(), cfg)
    Path(f"{out}.rank{procs.rank}.json").write_text(json.dumps(
        {"world": procs.world, "shards": shards, "losses": [r.losses for r in res]}))
    if procs.master:
        save_adapter(model, out)
        from safetensors.torch import save_file

        save_file({f"g{i}": g for i, g in enumerate(grads)}, f"{out}.grad0.safetensors")
    distributed.stop_processes(wait=True)


if __name__ == "__main__":
    main()
