"""Data-parallel absorption of one document: `torchrun --nproc_per_node N absorb.py ...`.

The script joins the process group (start_processes: gloo on CPU, NCCL on CUDA with one GPU per
local rank); the absorption loop itself stays one loop (absorber.absorb_chunk) with three small
hooks that are no-ops in a single process:

    shard(rows, weights)     this rank's share of a step's Y sequences (balanced by tokens)
    broadcast_(params)       every rank starts a window from rank 0's LoRA
    all_reduce_(tensors)     sum the LoRA gradients (and the loss) over the ranks

The loss of a step is a token-weighted mean over all its Y sequences, and every rank weights its
own micro-batches by their share of the *whole* step's tokens, so the summed gradient is the
one-process gradient, up to float summation order (l1_norm and hybrid are normalised over the
whole step's rows, which every rank holds: absorber._accumulate). Every rank
computes the teacher targets of the window itself (one no-grad pass per window, not per step)
and takes the same decisions (subset, early stop) from the all-reduced loss. `single_process()`
turns the hooks off for work only rank 0 does (e.g. an evaluation after absorbing).
"""
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_ENABLED = True


@dataclass
class Procs:
    """This process's place in the run: the only process, or one rank of a torchrun job."""
    ddp: bool
    rank: int
    world: int
    device: str

    @property
    def master(self) -> bool:
        return self.rank == 0

    def log(self, *a, **kw) -> None:
        if self.master:
            print(*a, **kw)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def start_processes(device: str) -> Procs:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA, one GPU per local rank); a
    plain single-process Procs when not started by torchrun."""
    if not under_torchrun():
        return Procs(False, 0, 1, device)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Procs(True, rank, world, device)


def stop_processes(wait: bool = False) -> None:
    """Leave the process group. wait=True (a normal end): first wait for every rank, so that no
    rank tears its gloo threads down while rank 0 is still writing and evaluating."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def group() -> tuple[int, int]:
    """(rank, world size) of the data-parallel absorption: (0, 1) without a process group."""
    if _ENABLED and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def single_process():
    """Absorb (or anything else) in this process alone, even under torchrun: no collectives."""
    global _ENABLED
    saved, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = saved


def shard(rows: list, weights: list) -> list:
    """This rank's share of `rows` (weights[i] = tokens of row i): heaviest first, each to the
    rank with the fewest tokens so far (ties: lowest rank). Deterministic, the same on every
    rank; with fewer rows than ranks some ranks get none (they still join the all-reduce)."""
    rank, world = group()
    if world == 1:
        return list(rows)
    load = [0] * world
    mine = []
    for i in sorted(rows, key=lambda i: (-weights[i], i)):
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += weights[i]
        if r == rank:
            mine.append(i)
    return sorted(mine)


def all_reduce_(tensors) -> None:
    """Sum tensors in place over the ranks (one flat buffer, one collective)."""
    _, world = group()
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    off = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[off:off + n].view_as(t))
        off += n


def all_reduce_grads_(params) -> None:
    """Sum the gradients of `params` over the ranks; a rank without a gradient (no rows this
    step) contributes zeros."""
    if group()[1] == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_([p.grad for p in params])


def all_reduce_sum(x: float, device) -> float:
    """A float summed over the ranks."""
    if group()[1] == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64 if not str(device).startswith("mps") else torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t)


@torch.no_grad()
def broadcast_(params, src: int = 0) -> None:
    """Every rank takes rank `src`'s values of `params`."""
    if group()[1] == 1 or not params:
        return
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    dist.broadcast(flat, src)
    off = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[off:off + n].view_as(p))
        off += n
