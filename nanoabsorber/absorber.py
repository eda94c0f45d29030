"""Absorber LLM (arXiv 2604.20915): absorb a context X into LoRA weights so that the model without
X behaves like the original model with X on the text that follows.

Algorithm 1 (absorb one chunk), in token ids:
    teacher input  = P · X · Y_j      (one no-grad pass per chunk; X is prefilled into a KV cache
                                       once, then each Y_j runs on top of it)
    student input  = P · Y_j          (the LoRA model, X gone)
    loss           = distance between teacher and student on the positions of every Y_j
P is a short prefix both see, so that generation later starts the same way as the student did:
BOS for tokenizers that add one (Llama-2 style), nothing for SmolLM2 raw text, and the chat
header "<|im_start|>system…<|im_end|>\\n<|im_start|>user\\n" for chat probes (X is then the
document at the start of a user message, exactly as "document in the prompt" would place it).

Losses (AbsorbConfig.loss): "l1" (the paper: mean |h̃ - h| over every layer h^0..h^L and every
Y position but the student's attention sink: see AbsorbConfig.sink_positions), "mse", "l1_norm" (per-layer L1 / teacher L1), "kl" (KL(teacher || student) on
next-token distributions: logits-only distillation), "hybrid" (l1_norm + kl_weight · kl, Deep
Context Distillation style). Objective "ntp" is the TTT / Temp-LoRA baseline: next-token loss on
P · X itself. All go through the same loop (same optimizer, steps, early stop).

Algorithm 2 (streaming): `absorb_stream` slides over a token stream: X = the next n tokens,
Y = the m tokens after them (teacher-generated when the stream runs out), absorb, slide by n.
The updated model is the next chunk's teacher. Memory is bounded by n + m, not the stream.
"""
import bisect
import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from .config import in_range, non_negative, positive, setting, validate
from .losses import hidden_sync_loss, linear_kl_loss
from .lora import LoRAConfig, lora_disabled, lora_parameters, lora_state_dict
from .sampling import sample_next

# Two recipes, chosen by what Y is made of (AbsorbConfig.resolved fills the automatic settings).
# Chat probes (README "Long documents"; tuned with bench/long_window_tune.py on tuning catalogues,
# seeds 100+, and the demo document): Y = passage probes (about + fact: cue-to-fact questions, each
# passage's teacher sees that passage alone), the base model as teacher (an updated teacher passed
# the adapter's mistakes on: 0.13 vs 1.00 on a stream's last window), windows of 1024 tokens
# trained jointly (window after window, earlier windows were forgotten: 0.00), no raw following
# text, 13 passes over each window's Y in steps of 512 Y tokens (at most 150 steps) at lr 3e-3, the
# hybrid loss (hidden-state L1 alone put no fact within reach of a question: 0.00 vs 0.73).
# Raw-text Y (no chat probes: --probes "" or a base model; README "Continuation fidelity", tuned on
# bench/texts/tune_*): windows of 1024, the 512 real following tokens and, where they run out,
# RAW_GEN_TOKENS teacher-sampled tokens in gen_samples continuations, 10 steps over all Y at lr
# 3e-3, the hybrid loss (per-layer normalised L1 + KL), the updated model as teacher (Algorithm 2).
DEFAULT_PROBES = "about,fact"
PROBE_LR, RAW_TEXT_LR = 3e-3, 3e-3
PROBE_STEPS, RAW_STEPS = 150, 10
PROBE_LOSS, RAW_LOSS = "hybrid", "hybrid"
PROBE_CHUNK, RAW_CHUNK = 1024, 1024
PROBE_SYNC_LEN, RAW_SYNC_LEN = 0, 512
PROBE_BATCH_TOKENS, RAW_BATCH_TOKENS = 512, 0
PROBE_TEACHER, RAW_TEACHER = "base", "updated"
PROBE_EPOCHS, RAW_EPOCHS = 13.0, 0.0
RAW_GEN_TOKENS = 512
LOSSES = ("l1", "mse", "l1_norm", "kl", "hybrid")
PROBE_KINDS = ("recite", "entity", "cloze", "continue", "about", "fact")   # probes.py
OBJECTIVES = ("sync", "ntp")


def _probe_check(v: str):
    try:
        probe_kinds(v)
    except ValueError as e:
        return str(e)
    return None


@dataclass
class AbsorbConfig:
    """The absorption recipe (absorb.py's and eval.py's flags are built from these fields)."""
    objective: str = setting("sync", "sync (Absorber) or ntp (next-token prediction on the text: the TTT / "
                             "Temp-LoRA baseline)", choices=OBJECTIVES)
    loss: Optional[str] = setting(None, f"sync loss: hidden-state l1 (paper), mse, l1_norm, kl (logits only), hybrid "
                                  f"(l1_norm + kl) (automatic: {PROBE_LOSS} when Y holds chat probes, {RAW_LOSS} for "
                                  f"raw-text Y)", choices=LOSSES)
    kl_weight: float = setting(1.0, "weight of the KL term in the hybrid loss", check=non_negative)
    temperature: float = setting(1.0, "softmax temperature of the KL term", check=positive)
    steps: Optional[int] = setting(None, f"max optimizer steps per window (K) (automatic: {PROBE_STEPS} when Y holds "
                                   f"chat probes, {RAW_STEPS} for raw-text Y)", check=non_negative)
    epochs: Optional[float] = setting(None, f"if > 0 (with batch-tokens > 0): steps per window = epochs x the window's "
                                      f"Y tokens / batch-tokens, at most --steps, so a window of many probes gets "
                                      f"as many passes as one of few (automatic: {PROBE_EPOCHS:g} with chat probes, "
                                      f"{RAW_EPOCHS:g} (off) for raw-text Y)", check=non_negative)
    eps: float = setting(0.0, "early stop when the loss falls below this (paper: 2 on Llama-2-7B)",
                         check=non_negative)
    lr: Optional[float] = setting(None, f"AdamW learning rate (automatic: {PROBE_LR:g} when Y holds chat probes, "
                                  f"{RAW_TEXT_LR:g} for raw-text Y)", check=positive)
    schedule: str = setting("constant", "learning-rate schedule: constant, or cosine decay to 0 over the steps",
                            choices=("constant", "cosine"))
    weight_decay: float = setting(0.0, "AdamW weight decay", check=non_negative)
    grad_clip: float = setting(1.0, "max gradient norm (0 = off)", check=non_negative)
    chunk: Optional[int] = setting(None, f"n: tokens absorbed per window (automatic: {PROBE_CHUNK} with chat probes, "
                                   f"{RAW_CHUNK} for raw-text Y)", check=positive)
    sync_len: Optional[int] = setting(None, f"m: real following tokens used as Y per window (automatic: "
                                      f"{PROBE_SYNC_LEN} with chat probes, {RAW_SYNC_LEN} for raw-text Y)",
                                      check=non_negative)
    gen_tokens: Optional[int] = setting(None, f"teacher-generated Y tokens where the following text is short "
                                        f"(last window) (automatic: 0 with chat probes, {RAW_GEN_TOKENS} "
                                        f"otherwise)", check=non_negative)
    gen_temperature: float = setting(0.8, "sampling temperature of generated Y", check=positive)
    gen_top_p: float = setting(0.95, "nucleus threshold of generated Y", check=in_range(0.01, 1.0))
    gen_samples: int = setting(8, "generated continuations per window (gen-tokens split among them)",
                               check=positive)
    gen_points: int = setting(1, "points of each window that generated Y continues from: 1 = its end only (after "
                              "the real following text); k > 1 adds k - 1 evenly spaced points inside the window "
                              "(teacher context: the window up to the point); gen-samples are dealt out over them",
                              check=positive)
    batch_tokens: Optional[int] = setting(None, f"Y tokens per optimizer step, a random subset of the Y sequences "
                                          f"(0 = all) (automatic: {PROBE_BATCH_TOKENS} with chat probes, "
                                          f"{RAW_BATCH_TOKENS or 'all'} for raw-text Y)", check=non_negative)
    probes: str = setting(DEFAULT_PROBES, "chat probe kinds added to Y for chat models: comma list of "
                          f"{', '.join(PROBE_KINDS)} ('' for none); see nanoabsorber/probes.py", check=_probe_check)
    sink_positions: int = setting(1, "leading positions of every student sequence left out of the hidden-state "
                                  "loss: a sequence's first token is the model's attention sink, whose states are "
                                  "far larger than the teacher's at that place and would dominate the distance (a "
                                  "no-op where a prefix such as BOS or the chat header comes first)",
                                  check=non_negative)
    lora: LoRAConfig = setting(default_factory=LoRAConfig, help="LoRA")
    seed: int = setting(0, "random seed (LoRA init, Y subsets, generated Y)")
    teacher: Optional[str] = setting(None, f"the teacher of each window: updated (the model with the LoRA learned so "
                                     f"far, Algorithm 2) or base (the model without LoRA: enough for passage probes, "
                                     f"whose teacher context is their own passage, and it does not pass a drifting "
                                     f"adapter's mistakes on) (automatic: {PROBE_TEACHER} with chat probes, "
                                     f"{RAW_TEACHER} for raw-text Y)", choices=("updated", "base"))
    replay: int = setting(64, "passage probes: passages of earlier windows absorbed again in each window (all of "
                          "them, or a random sample of this many; their targets recomputed by the teacher), "
                          "against forgetting; only the passages' text is kept", check=non_negative)
    replay_share: float = setting(0.33, "with replayed passages in a window: the share of each step's Y tokens drawn "
                                  "from them (the rest from the window's new Y), so --replay can cover every "
                                  "earlier passage at a fixed cost (0 = rows drawn alike, whatever their share)",
                                  check=in_range(0.0, 0.9))
    checkpoint_activations: bool = setting(False, "recompute each block in the backward pass instead of keeping "
                                           "its activations (less memory, more time; same result)")
    micro_tokens: int = setting(256, "padded tokens per forward/backward pass: each step's Y sequences run in "
                                "length-sorted micro-batches of at most this many (a longer sequence alone), "
                                "gradients accumulated, so activation memory follows this, not --batch-tokens "
                                "(smaller: less memory, a little more time; the same gradient for every loss: "
                                "l1_norm and hybrid are normalised over the whole step)", check=positive)

    def __post_init__(self):
        validate(self)

    def resolved(self, chat_probes: bool) -> "AbsorbConfig":
        """This config with the automatic (None) settings (AUTOMATIC) filled in for a Y that does
        (chat_probes=True) or does not hold chat probes."""
        return replace(self, **{k: v if (v := getattr(self, k)) is not None else (probe if chat_probes else raw)
                                for k, (probe, raw) in AUTOMATIC.items()})


# setting -> (with chat probes, raw-text Y): what AbsorbConfig.resolved fills in for None
AUTOMATIC = {"lr": (PROBE_LR, RAW_TEXT_LR), "steps": (PROBE_STEPS, RAW_STEPS), "loss": (PROBE_LOSS, RAW_LOSS),
             "gen_tokens": (0, RAW_GEN_TOKENS), "chunk": (PROBE_CHUNK, RAW_CHUNK),
             "sync_len": (PROBE_SYNC_LEN, RAW_SYNC_LEN), "batch_tokens": (PROBE_BATCH_TOKENS, RAW_BATCH_TOKENS),
             "teacher": (PROBE_TEACHER, RAW_TEACHER), "epochs": (PROBE_EPOCHS, RAW_EPOCHS)}


@dataclass
class Targets:
    """What the teacher said about the Y sequences of one chunk."""
    ids: torch.Tensor                    # (B, T) student input P·Y_j, right-padded
    mask: torch.Tensor                   # (B, T) bool: True at Y positions (loss positions)
    hidden: Optional[torch.Tensor]       # (L+1, N, D) teacher hidden states at the N masked positions
    final: Optional[torch.Tensor]        # (N, D) teacher post-norm final hidden at those positions
    replayed: list = field(default_factory=list)   # (B,) per row: from a Replayed group (earlier window)
    _magnitudes: dict = field(default_factory=dict, repr=False, compare=False)   # sink_positions -> per row

    def magnitude(self, r: list, sink_positions: int) -> torch.Tensor:
        """(L+1,) per layer: the sum of |teacher state| over the counted positions of rows r (the
        positions past the sink, or all of them where no row of r has any): l1_norm's denominator.
        Per-row sums are computed once per Targets, one layer at a time, so no rows are copied."""
        if sink_positions not in self._magnitudes:
            pos = self.mask.nonzero()                                          # (N, 2) row, column
            keep = _past_sink(self, sink_positions)
            k = keep.nonzero().squeeze(1)                                      # found once, not per layer
            B, L1 = self.mask.shape[0], self.hidden.shape[0]
            kept, every = torch.zeros(B, L1, device=pos.device), torch.zeros(B, L1, device=pos.device)
            for li in range(L1):
                a = self.hidden[li].abs().sum(-1, dtype=torch.float32)            # (N,)
                every[:, li].index_add_(0, pos[:, 0], a)
                kept[:, li].index_add_(0, pos[k, 0], a[k])
            n_kept = torch.zeros(B, device=pos.device).index_add_(0, pos[:, 0], keep.float())
            self._magnitudes[sink_positions] = (kept, every, n_kept)
        kept, every, n_kept = self._magnitudes[sink_positions]
        return (kept if bool(n_kept[r].sum() > 0) else every)[r].sum(0)

    def cat(self, other: "Targets") -> "Targets":
        """These rows, then other's (right-padded to one width)."""
        T = max(self.ids.shape[1], other.ids.shape[1])

        def pad(x):
            out = torch.zeros((x.shape[0], T), dtype=x.dtype, device=x.device)
            out[:, :x.shape[1]] = x
            return out
        return Targets(torch.cat([pad(self.ids), pad(other.ids)]), torch.cat([pad(self.mask), pad(other.mask)]),
                       None if self.hidden is None else torch.cat([self.hidden, other.hidden], 1),
                       None if self.final is None else torch.cat([self.final, other.final]),
                       self.replayed + other.replayed)

    def rows(self, r: list) -> "Targets":
        """The targets of a subset of rows (Y sequences), in that order."""
        counts = self.mask.sum(1).tolist()
        starts = [0]
        for c in counts[:-1]:
            starts.append(starts[-1] + c)
        cols = torch.cat([torch.arange(starts[i], starts[i] + counts[i]) for i in r]).to(self.mask.device)
        ids, mask = self.ids[r], self.mask[r]
        T = int(mask.nonzero()[:, 1].max()) + 1 if mask.any() else ids.shape[1]
        return Targets(ids[:, :T], mask[:, :T], None if self.hidden is None else self.hidden[:, cols],
                       None if self.final is None else self.final[cols],
                       [self.replayed[i] for i in r] if self.replayed else [])


@dataclass
class ChunkResult:
    steps: int
    first_loss: float
    final_loss: float
    losses: list = field(default_factory=list)
    stopped: str = "max steps"           # "max steps" | "early stop" | "non-finite loss" | "nothing to absorb"
    seconds: float = 0.0
    y_tokens: int = 0                    # Y tokens of the window (trained on at every step with batch_tokens 0)


def _device(model):
    return model.embed.weight.device


def _pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long, device=device)
    real = torch.zeros((len(seqs), T), dtype=torch.bool, device=device)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, device=device)
        real[i, :len(s)] = True
    return ids, real


Group = tuple  # (prefix P, context X, [Y_1, Y_2, ...]) as token id lists


LAZY_REPLAY = True   # False: replayed passages' targets kept for the whole window (the tests' reference)


class Replayed(tuple):
    """A group (P, X, [Y_j]) absorbed again from an earlier window (cfg.replay): trained on like
    any other, but not new, so it neither makes a window worth absorbing nor adds steps."""


@torch.no_grad()
def teacher_targets(model, groups: list, need_hidden: bool, need_final: bool) -> Targets:
    """One no-grad teacher pass over P·X·Y_j for every group and j; each group's P·X is prefilled
    into a KV cache once and every Y_j of the group runs on top of it."""
    dev = _device(model)
    seqs, hid, fin, n_prefix, replayed = [], [], [], [], []
    for group in groups:
        prefix, x, ys = group
        ys = [list(y) for y in ys if len(y) > 0]
        if not ys:
            continue
        ctx = list(prefix) + list(x)
        cache = model.new_cache(1, len(ctx) + max(len(y) for y in ys))
        if ctx:
            model(torch.tensor([ctx], device=dev), cache=cache, logits=False)
        for y in ys:
            cache.pos = len(ctx)
            _, hs = model(torch.tensor([y], device=dev), cache=cache, hidden=True, logits=False)
            if need_hidden:
                hid.append(torch.stack([h[0] for h in hs]))                   # (L+1, len(y), D)
            if need_final:
                fin.append(model.norm(hs[-1][0]))                               # (len(y), D)
            seqs.append(list(prefix) + y)
            n_prefix.append(len(prefix))
            replayed.append(isinstance(group, Replayed))
    if not seqs:
        raise ValueError("no Y tokens to synchronise on")
    ids, mask = _pad(seqs, 0, dev)
    for i, npf in enumerate(n_prefix):
        mask[i, :npf] = False
    return Targets(ids, mask, torch.cat(hid, 1) if need_hidden else None, torch.cat(fin, 0) if need_final else None,
                   replayed)


def _past_sink(t: Targets, sink_positions: int, flat: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N,) bool: the Y positions past a sequence's first sink_positions (not an attention sink).
    flat: the Y positions' places in (B*T) where the caller has found them already."""
    cols = t.mask.nonzero()[:, 1] if flat is None else flat % t.mask.shape[1]
    return cols >= sink_positions


def _kept(t: Targets, sink_positions: int, flat: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N,) bool: the Y positions the hidden-state losses count (past the sink; all of them where
    nothing else is left; Targets.magnitude applies the same rule to any subset of rows)."""
    keep = _past_sink(t, sink_positions, flat)
    return keep if bool(keep.any()) else torch.ones_like(keep)


def sync_loss(model, t: Targets, cfg: AbsorbConfig, layer_scale: Optional[torch.Tensor] = None,
              kl_scale: float = 1.0) -> torch.Tensor:
    """Student pass on P·Y_j and the configured distance to the teacher at the Y positions.
    layer_scale (optional (L+1,)) and kl_scale: constant factors of the per-layer hidden-state terms
    and of the KL term (how _accumulate makes the losses of micro-batches sum to the whole batch's)."""
    cfg = cfg if cfg.loss else cfg.resolved(chat_probes=False)
    _, hs = model(t.ids, hidden=True, logits=False)
    flat = t.mask.flatten().nonzero().squeeze(1)                            # (N,) Y positions in (B*T)
    loss = 0.0
    if cfg.loss in ("l1", "mse", "l1_norm", "hybrid"):
        kind = "l1_norm" if cfg.loss == "hybrid" else cfg.loss
        kept = _kept(t, cfg.sink_positions, flat).nonzero().squeeze(1)      # (N',) not an attention sink
        at = flat[kept]                                                     # (N',) their places in (B*T)
        # every kind is a mean over layers of a per-layer distance: summed layer by layer, so no
        # (L+1, N', D) stack of the student's states and the loss's temporaries ever exists at once;
        # index_select with indices found once, not a boolean mask per layer (a host sync each on CUDA)
        loss = sum(hidden_sync_loss(h.flatten(0, 1).index_select(0, at)[None],                # (1, N', D)
                                    t.hidden[li:li + 1].index_select(1, kept), kind)
                   * (1.0 if layer_scale is None else layer_scale[li])
                   for li, h in enumerate(hs)) / len(hs)
    if cfg.loss in ("kl", "hybrid"):
        s_final = model.norm(hs[-1].flatten(0, 1).index_select(0, flat))   # (N, D) = hs[-1][t.mask]
        kl = linear_kl_loss(s_final, model.output.weight, teacher_h=t.final, temperature=cfg.temperature)
        loss = loss + (cfg.kl_weight if cfg.loss == "hybrid" else 1.0) * kl_scale * kl
    return loss


def ntp_loss(model, ids: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """Next-token cross-entropy on P·X, counted on the X tokens only (TTT / Temp-LoRA)."""
    logits = model(ids)                                                     # (1, T, V)
    tgt = ids[:, 1:].clone()
    tgt[:, : max(n_prefix - 1, 0)] = -100
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tgt.flatten(), ignore_index=-100)


def _accumulate(model, t: Targets, rows: list, cfg: AbsorbConfig, backward: bool) -> float:
    """Loss over `rows` of the targets, as length-sorted micro-batches of at most cfg.micro_tokens
    padded tokens (little padding waste, bounded activation memory); each micro-batch's loss is
    weighted by its share of the Y tokens, and the per-layer normalised kinds (l1_norm, hybrid)
    rescale each layer by the micro-batch's share of the teacher's magnitude, so the sum is the
    loss over all rows, whatever the micro-batches. Backward runs per micro-batch. Under a
    process group (nanoabsorber.distributed) each rank takes its share of the rows, weighted by
    the whole step's tokens; the returned loss is summed over the ranks."""
    from . import distributed

    cfg = cfg if cfg.loss else cfg.resolved(chat_probes=False)
    lengths = t.mask.sum(1).tolist()
    # each row's last Y position + 1, in one host sync (a per-row .nonzero() is a sync per row on CUDA)
    ends = (t.mask * torch.arange(1, t.mask.shape[1] + 1, device=t.mask.device)).amax(1).tolist()
    # the tokens each row's loss averages over: the hidden-state losses leave out the sink positions
    counted = lengths if cfg.loss == "kl" else t.mask[:, cfg.sink_positions:].sum(1).tolist()
    counted = counted if sum(counted[i] for i in rows) else lengths
    n_total = sum(counted[i] for i in rows)            # the whole step's loss tokens, on every rank
    order = sorted(distributed.shard(rows, lengths), key=lambda i: ends[i])   # this rank's share
    micro, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * ends[i] > cfg.micro_tokens:
            micro.append(cur)
            cur = []
        cur.append(i)
    if cur:
        micro.append(cur)
    normed = cfg.loss in ("l1_norm", "hybrid")
    den = t.magnitude(rows, cfg.sink_positions) if normed else None            # (L+1,) the whole step's
    total = 0.0
    for mb in micro:
        share = sum(counted[i] for i in mb) / n_total
        tm = t.rows(mb)
        scale = t.magnitude(mb, cfg.sink_positions).add(1e-6) / den.add(1e-6) / share if normed else None
        # the hybrid's KL term averages over every Y position, sinks included: its own share
        kl_share = sum(lengths[i] for i in mb) / sum(lengths[i] for i in rows) if cfg.loss == "hybrid" else share
        loss = sync_loss(model, tm, cfg, scale, kl_share / share) * share
        if backward:
            loss.backward()
        total += float(loss.detach())
    return distributed.all_reduce_sum(total, _device(model))   # the step's loss, the same on every rank


def absorb_chunk(model, groups: list, cfg: AbsorbConfig, log: Optional[Callable[[dict], None]] = None,
                 new_y_tokens: Optional[int] = None) -> ChunkResult:
    """Algorithm 1 on one chunk. groups: [(P, X, [Y_1, ...]), ...] (usually one group; chat probes
    add a group with the chat prefix). The model must already carry LoRA (apply_lora). An automatic
    (None) lr is taken as raw-text Y's; absorb_stream / absorb_text resolve it knowing Y."""
    from . import distributed

    cfg = cfg.resolved(chat_probes=False)
    params = lora_parameters(model)
    if not params:
        raise ValueError("absorb_chunk: apply_lora(model, ...) first")
    t0 = time.time()
    distributed.broadcast_(params)  # under torchrun every rank starts from rank 0's LoRA
    was_training, was_ckpt = model.training, getattr(model, "grad_checkpointing", False)
    model.eval()  # no dropout in the base model; LoRA dropout (if any) is its own module
    model.grad_checkpointing = cfg.checkpoint_activations
    if cfg.objective == "ntp":
        prefix, x, _ = groups[0]
        ids = torch.tensor([list(prefix) + list(x)], device=_device(model))
        world = distributed.group()[1]  # one sequence: not split; every rank computes it, 1/world each

        def run_step(backward: bool, final: bool = False) -> float:
            loss = ntp_loss(model, ids, len(prefix)) / world
            if backward:
                loss.backward()
            return distributed.all_reduce_sum(float(loss.detach()), _device(model))
    else:
        def teach(gs: list) -> Targets:
            with lora_disabled(model) if cfg.teacher == "base" else contextlib.nullcontext():
                return teacher_targets(model, gs, cfg.loss != "kl", cfg.loss in ("kl", "hybrid"))

        # with the base teacher a replayed passage's targets do not change within the window: they are
        # computed for the rows a step draws instead of kept for all of them, so memory follows the
        # step, not the number of earlier passages (the same numbers: each group is taught alone)
        new_groups = [g for g in groups if not isinstance(g, Replayed)]
        old = [(gi, j) for gi, g in enumerate(groups) if isinstance(g, Replayed) for j, y in enumerate(g[2]) if len(y)]
        lazy = (LAZY_REPLAY and cfg.teacher == "base" and cfg.replay_share > 0 and cfg.batch_tokens > 0 and bool(old)
                and any(len(y) for g in new_groups for y in g[2]))
        targets = teach(new_groups if lazy else groups)
        n_kept = targets.ids.shape[0]                       # rows whose targets are kept: 0 .. n_kept - 1
        sizes = targets.mask.sum(1).tolist() + ([len(groups[gi][2][j]) for gi, j in old] if lazy else [])
        replayed = targets.replayed + ([True] * len(old) if lazy else [])
        rng = torch.Generator().manual_seed(cfg.seed)
        pools = [[i for i, r in enumerate(replayed) if not r], [i for i, r in enumerate(replayed) if r]]
        split = cfg.replay_share > 0 and all(pools)

        def step_targets(rows: list) -> tuple:
            """(targets, their rows) for rows of the window: the kept ones, and with lazy replay the
            drawn replayed rows taught now (their groups' P·X prefilled once each)."""
            if not lazy:
                return targets, rows
            kept, drawn = [r for r in rows if r < n_kept], [old[r - n_kept] for r in rows if r >= n_kept]
            if not drawn:                                   # the final loss: the kept rows as they are
                return targets, kept
            by_group = {}
            for gi, j in drawn:
                by_group.setdefault(gi, []).append(j)
            t = targets.rows(kept).cat(teach([(groups[gi][0], groups[gi][1], [groups[gi][2][j] for j in js])
                                              for gi, js in by_group.items()]))
            return t, list(range(t.ids.shape[0]))

        def draw(pool: list, budget: float) -> list:        # random rows of pool up to budget Y tokens
            rows, total = [], 0
            for j in torch.randperm(len(pool), generator=rng).tolist():
                rows.append(pool[j])
                total += sizes[pool[j]]
                if total >= budget:
                    break
            return rows

        def run_step(backward: bool, final: bool = False) -> float:
            # the final loss is over every row, or with lazy replay over the kept (new) rows only
            rows = list(range(n_kept if lazy and final else len(sizes)))
            if cfg.batch_tokens > 0 and sum(sizes) > cfg.batch_tokens and not final:
                rows = (sorted(draw(pools[0], (1 - cfg.replay_share) * cfg.batch_tokens)
                               + draw(pools[1], cfg.replay_share * cfg.batch_tokens)) if split
                        else draw(list(range(len(sizes))), cfg.batch_tokens))
            return _accumulate(model, *step_targets(rows), cfg, backward)

    n_steps = cfg.steps
    if cfg.objective != "ntp" and cfg.epochs > 0 and cfg.batch_tokens > 0:   # as many steps as passes need
        # over the window's new Y: replayed passages ride along in the batches but add no steps, or a
        # window with little new text would spend many steps on a few old passages (and forget the rest)
        new = sum(sizes) if new_y_tokens is None else new_y_tokens
        n_steps = min(cfg.steps, math.ceil(cfg.epochs * new / cfg.batch_tokens))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 1.0 if cfg.schedule == "constant" else 0.5 * (1 + math.cos(math.pi * i / max(n_steps, 1))))
    for m in model.modules():
        if hasattr(m, "lora_A"):
            m.train()  # LoRA dropout active while absorbing
    res = ChunkResult(0, math.nan, math.nan)
    good = {k: v.clone() for k, v in lora_state_dict(model).items()}
    for step in range(n_steps + 1):
        last = step == n_steps
        opt.zero_grad(set_to_none=True)
        with torch.no_grad() if last else torch.enable_grad():
            lv = run_step(backward=not last, final=last)
        if not math.isfinite(lv):
            model.load_state_dict(good, strict=False)
            res.stopped = "non-finite loss"
            break
        res.losses.append(lv)
        if step == 0:
            res.first_loss = lv
        res.final_loss = lv
        if last:
            break  # the last entry is the loss after the final update (no step taken)
        if lv < cfg.eps:
            res.stopped = "early stop"
            break
        good = {k: v.clone() for k, v in lora_state_dict(model).items()}
        distributed.all_reduce_grads_(params)  # the one-process gradient (no-op in one process)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        res.steps += 1
        if log:
            log({"step": res.steps, "of": n_steps, "loss": lv, "elapsed": time.time() - t0})
    for m in model.modules():
        if hasattr(m, "lora_A"):
            m.eval()
    model.train(was_training)
    model.grad_checkpointing = was_ckpt
    res.seconds = time.time() - t0
    return res


@torch.no_grad()
def sample_continuations(model, context: list[int], n_samples: int, n_tokens: int, temperature: float = 0.8,
                         top_p: Optional[float] = 0.95, stop_ids: Iterable[int] = (), seed: int = 0) -> list[list[int]]:
    """n_samples continuations of `context` decoded in one batch (context prefilled once).
    A sample ends after a stop id (kept) or n_tokens."""
    if n_samples <= 0 or n_tokens <= 0:
        return []
    dev = _device(model)
    g = torch.Generator(device=dev).manual_seed(seed)
    cache = model.new_cache(1, len(context) + n_tokens)
    logits = model(torch.tensor([context], device=dev), cache=cache)[:, -1]      # (1, V)
    cache.k = cache.k.expand(-1, n_samples, -1, -1, -1).contiguous()          # share the prefix
    cache.v = cache.v.expand(-1, n_samples, -1, -1, -1).contiguous()
    logits = logits.expand(n_samples, -1)
    out = [[] for _ in range(n_samples)]
    done = torch.zeros(n_samples, dtype=torch.bool, device=dev)
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
    for _ in range(n_tokens):
        nxt = sample_next(logits, temperature, None, top_p, g)                  # (B,)
        for i in range(n_samples):
            if not done[i]:
                out[i].append(int(nxt[i]))
        done |= torch.isin(nxt, stop)
        if bool(done.all()):
            break
        logits = model(nxt.view(-1, 1), cache=cache)[:, -1]
    return out


def chunk_windows(n_tokens: int, n: int, m: int) -> list[tuple[int, int, int]]:
    """Algorithm 2's windows over a stream of n_tokens: (x_start, x_end, y_end)."""
    out, s = [], 0
    while s < n_tokens:
        e = min(s + n, n_tokens)
        out.append((s, e, min(e + m, n_tokens)))
        s = e
    return out


def window_groups(model, prefix: list[int], x: list[int], real: list[int], cfg: AbsorbConfig, stop_ids=(),
                  seed: int = 0) -> list:
    """The raw-text (P, X, [Y_j]) groups of one window X whose real following text is `real`:
    Y = real when it is cfg.sync_len long; otherwise (the last window, or a window whose
    following text stays in the attention window) cfg.gen_samples teacher samples of
    cfg.gen_tokens // cfg.gen_samples tokens each are added, dealt out over cfg.gen_points points:
    the end (a sample continues P·X·real and is synced as real + sample) and gen_points - 1
    evenly spaced points inside X (the teacher sees P·X[:p], the student the sample alone)."""
    ys = [real] if real else []
    groups = []
    if len(real) < cfg.sync_len and cfg.gen_tokens > 0 and cfg.gen_samples > 0 and cfg.objective == "sync":
        per = max(1, cfg.gen_tokens // cfg.gen_samples)
        n_points = max(1, min(cfg.gen_points, cfg.gen_samples, len(x)))
        points = [len(x)] + [round(k * len(x) / n_points) for k in range(1, n_points)]
        counts = [cfg.gen_samples // n_points + (i < cfg.gen_samples % n_points) for i in range(n_points)]
        for i, (pt, n) in enumerate(zip(points, counts)):
            ctx = list(prefix) + x[:pt] + (real if i == 0 else [])
            gens = [g for g in sample_continuations(model, ctx, n, per, cfg.gen_temperature, cfg.gen_top_p,
                                                    stop_ids, seed=seed if i == 0 else seed * 1000 + i) if g]
            if i == 0:   # a generated Y continues after the real text: synced as real + generated
                ys = [real + g for g in gens] or ys
            elif gens:
                groups.append((list(prefix), x[:pt], gens))
    return ([(list(prefix), x, ys)] if ys else []) + groups


def absorb_stream(model, stream: list[int], cfg: AbsorbConfig, prefix: list[int] = (), stop_ids=(),
                  log: Optional[Callable[[dict], None]] = None, extra_ys: Optional[Callable] = None,
                  start: int = 0, on_window: Optional[Callable[[int, ChunkResult], None]] = None,
                  end: Optional[int] = None) -> list:
    """Algorithm 2 over a token stream (list or 1-D array; only windows of n + m are touched).
    Y per window: window_groups (the m real following tokens, plus teacher-generated ones where
    the real following text is shorter than m: always for the last window). extra_ys(chunk_index,
    x_ids) -> list of (P, X, [Y_j]) groups lets callers add more Y sets (e.g. chat probes with
    their own prefix); with it, an automatic lr / gen_tokens is resolved as for chat probes
    (AbsorbConfig.resolved). end: absorb stream[:end] only; the tokens after it (text that stays
    in the attention window) serve as Y of the last window, never as X. Returns a ChunkResult per
    window. Resuming: windows before `start` are skipped (the model must already hold their LoRA);
    on_window(index, result) runs after each finished window (absorb.py saves its state there)."""
    cfg = cfg.resolved(chat_probes=extra_ys is not None)
    results = []
    n_abs = len(stream) if end is None else end
    wins = chunk_windows(n_abs, cfg.chunk, cfg.sync_len)
    absorbed = sum(e - s for s, e, _ in wins[:start])
    for ci, (s, e, _) in enumerate(wins):
        if ci < start:
            continue
        x = [int(t) for t in stream[s:e]]
        real = [int(t) for t in stream[e:min(e + cfg.sync_len, len(stream))]]
        groups = window_groups(model, list(prefix), x, real, cfg, stop_ids, seed=cfg.seed + ci)
        if extra_ys is not None:
            groups += list(extra_ys(ci, x))
        new = [g for g in groups if not isinstance(g, Replayed)]
        if not new and extra_ys is not None and cfg.objective != "ntp":
            # passage probes only, and no passage starts in this window (its text is probed with the
            # passage it continues; replayed passages alone are not a reason to train): nothing to absorb
            res = ChunkResult(0, math.nan, math.nan, stopped="nothing to absorb")
            results.append(res)
            absorbed += len(x)
            if on_window:
                on_window(ci, res)
            continue
        if not groups:
            if cfg.objective != "ntp":
                raise ValueError("nothing to synchronise on: no following text; set gen_tokens > 0")
            groups = [(list(prefix), x, [])]
        cb = (lambda d, ci=ci: log({**d, "chunk": ci + 1, "chunks": len(wins), "absorbed": absorbed})) if log else None
        res = absorb_chunk(model, groups, cfg, cb, new_y_tokens=sum(len(y) for _, _, ys in new for y in ys))
        res.y_tokens = sum(len(y) for _, _, ys in groups for y in ys)
        results.append(res)
        absorbed += len(x)
        if on_window:
            on_window(ci, res)
    return results


def probe_kinds(probes: str) -> set:
    """The probe kinds of a comma list like "recite,entity"; ValueError for unknown ones."""
    kinds = {k.strip() for k in probes.split(",") if k.strip()}
    bad = kinds - set(PROBE_KINDS)
    if bad:
        raise ValueError(f"unknown probe kind(s) {sorted(bad)}; use {', '.join(PROBE_KINDS)}")
    return kinds


def uses_chat_probes(tok, cfg: AbsorbConfig) -> bool:
    """The one place that decides whether Y holds chat probes: a chat model, probe kinds given,
    sync objective. absorb_text and the scripts' printouts ask this."""
    return bool(probe_kinds(cfg.probes)) and bool(tok.chat_format) and cfg.objective == "sync"


def resolve_config(tok, cfg: AbsorbConfig) -> AbsorbConfig:
    """cfg with its automatic lr and gen_tokens filled in for this tokenizer (AbsorbConfig.resolved)."""
    return cfg.resolved(uses_chat_probes(tok, cfg))


def absorb_text(model, tok, text: str, cfg: AbsorbConfig, log: Optional[Callable[[dict], None]] = None,
                start: int = 0, on_window: Optional[Callable[[int, ChunkResult], None]] = None) -> list:
    """The high-level entry point (absorb.py, eval.py): absorb `text` into the LoRA of `model`
    (applied from cfg.lora if the model has none yet). Raw-text Y: the sync_len real tokens after
    each window (+ gen_tokens generated ones at the end). For chat models, each window also gets
    chat probes about its text (cfg.probes, a comma list of PROBE_KINDS; ""
    for none), see probes.py. Returns a ChunkResult per window. start / on_window: as in
    absorb_stream (resuming an interrupted absorption)."""
    from .lora import apply_lora, lora_modules
    from .probes import chat_probe_ids, make_probes, passage_probes

    cfg = resolve_config(tok, cfg)
    if not lora_modules(model):
        apply_lora(model, cfg.lora)
    ids = tok.encode(text)
    prefix = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    kinds = probe_kinds(cfg.probes)

    # passage probes belong to the window their passage starts in (a passage cut by a window's end
    # is still probed whole, with its topic); window kinds are made from the window's own text
    spans = passage_probes(text, kinds)
    win_ends = list(itertools.accumulate(len(tok.decode(ids[s:e])) for s, e, _ in
                                         chunk_windows(len(ids), cfg.chunk, cfg.sync_len))) if spans else []

    def chat_probes(ci, x):
        chunk_text = tok.decode(x)
        groups = []
        pr = make_probes(chunk_text, kinds)
        if pr:
            p, xc, ys, _ = chat_probe_ids(tok, chunk_text, pr)
            groups.append((p, xc, ys))
        win = [min(bisect.bisect_right(win_ends, start), len(win_ends) - 1) for start, _, _ in spans]
        mine = [i for i, w in enumerate(win) if w == ci]
        earlier = [i for i, w in enumerate(win) if w < ci]
        g = torch.Generator().manual_seed(cfg.seed * 7919 + ci)
        again = sorted(earlier[j] for j in torch.randperm(len(earlier), generator=g)[:cfg.replay].tolist())
        for i in mine + again:                                # the teacher sees the passage alone
            p, xc, ys, _ = chat_probe_ids(tok, spans[i][1], spans[i][2])
            groups.append((p, xc, ys) if i in mine else Replayed((p, xc, ys)))
        return groups

    use = uses_chat_probes(tok, cfg)
    return absorb_stream(model, ids, cfg, prefix, tok.stop_ids, log, chat_probes if use else None, start, on_window)
