"""Data-parallel absorption (nanoabsorber.distributed): the row shards partition a step's Y
sequences, two gloo processes under torchrun write the adapter one process writes (fp32
tolerance), and the memory options (activation checkpointing, bf16 base with fp32 LoRA) keep
the result."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nanoabsorber import distributed
from nanoabsorber.absorber import AbsorbConfig, absorb_chunk
from nanoabsorber.lora import LoRAConfig, LoRALinear, apply_lora, lora_parameters, lora_state_dict
from tests.conftest import ROOT, ids, tiny
from tests.conftest import write_tiny_checkpoint


def test_shards_partition_the_rows_balanced_by_tokens(monkeypatch):
    weights = [5, 40, 7, 33, 12, 12, 1]
    rows = [0, 1, 2, 3, 4, 5, 6]
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "group", lambda r=rank: (r, 3))
        shares.append(distributed.shard(rows, weights))
    assert sorted(i for s in shares for i in s) == rows                  # every row once
    loads = [sum(weights[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(weights)                       # balanced by tokens
    monkeypatch.setattr(distributed, "group", lambda: (1, 4))
    assert distributed.shard([2], weights) == []                        # fewer rows than ranks: nothing
    monkeypatch.undo()
    assert distributed.shard(rows, weights) == rows                     # one process: everything


def test_single_process_turns_the_hooks_off(monkeypatch):
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    assert distributed.group() == (1, 2)
    with distributed.single_process():
        assert distributed.group() == (0, 1)
        assert distributed.shard([0, 1, 2], [1, 1, 1]) == [0, 1, 2]
        assert distributed.all_reduce_sum(1.5, "cpu") == 1.5              # no collective
    assert distributed.group() == (1, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# hidden-state L1, all Y every step, micro-batches of 1024 padded tokens: the losses whose gradient
# sums exactly over shards; the first step's gradient is compared exactly, later steps as a whole
# (Adam amplifies summation-order noise, which depends on how the rows fall into micro-batches)
RECIPE = ["--chunk", "96", "--sync-len", "64", "--gen-tokens", "64", "--gen-samples", "4", "--steps", "4",
          "--lr", "1e-2", "--rank", "4", "--alpha", "8", "--loss", "l1", "--batch-tokens", "0", "--epochs", "0",
          "--micro-tokens", "1024"]


def _driver(n_procs: int, ckpt, text, out, extra=()) -> subprocess.CompletedProcess:
    script = str(ROOT / "tests" / "absorb_ddp_driver.py")
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(n_procs),
                                  "--master_port", str(free_port())] if n_procs > 1 else [])
    r = subprocess.run(launch + [script, str(ckpt), str(text), str(out), *RECIPE, *extra], cwd=ROOT,
                       capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, OMP_NUM_THREADS="1", NANOABSORBER_QUIET="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("loss", ["l1", "hybrid"])
def test_two_gloo_processes_write_the_one_process_adapter(tmp_path, loss):
    """l1 sums over shards by itself; hybrid (per-layer normalised L1 + KL) only because every rank
    divides by the whole step's teacher magnitude and takes its KL share of all the step's positions."""
    from nanoabsorber.benchdocs import make_fact_doc

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    text = tmp_path / "doc.txt"
    text.write_text(make_fact_doc(3, 110, 3).text)
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _driver(1, ckpt, text, one, ("--loss", loss))
    _driver(2, ckpt, text, two, ("--loss", loss))
    a, b = load_file(one), load_file(two)
    assert set(a) == set(b) and all(v.abs().sum() > 0 for k, v in a.items() if k.endswith("lora_B"))
    # the first step's all-reduced gradient is the one-process gradient to fp32 rounding
    ga, gb = load_file(f"{one}.grad0.safetensors"), load_file(f"{two}.grad0.safetensors")
    assert len(ga) == len(gb) > 0
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], atol=1e-7, rtol=1e-5)
    # after 4 AdamW steps (lr 1e-2) Adam's division by sqrt(v) turns summation-order noise in
    # near-zero gradient entries into visible elementwise differences (up to ~1e-3 of ~4e-2
    # updates): compare each tensor as a whole
    for k in a:
        rel = float((b[k] - a[k]).norm() / a[k].norm())
        assert rel < 2e-3, (k, rel)
    r1 = json.loads((tmp_path / "one.safetensors.rank0.json").read_text())
    ranks = [json.loads((tmp_path / f"two.safetensors.rank{r}.json").read_text()) for r in (0, 1)]
    assert r1["world"] == 1 and all(r["world"] == 2 for r in ranks)
    assert not (tmp_path / "two.safetensors.rank1.json").with_name("two.safetensors.rank2.json").exists()
    # the same losses on both ranks (the all-reduced loss), equal to one process's
    assert ranks[0]["losses"] == ranks[1]["losses"]
    for la, lb in zip(r1["losses"], ranks[0]["losses"]):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    # each step's rows were split: disjoint, together all of them, neither rank idle
    for s0, s1 in zip(ranks[0]["shards"], ranks[1]["shards"]):
        assert s0["rows"] == s1["rows"] and sorted(s0["mine"] + s1["mine"]) == sorted(s0["rows"])
        assert s0["mine"] and s1["mine"]


def test_absorb_py_under_torchrun(tiny_ckpt, tmp_path):
    """absorb.py itself with 2 gloo processes: rank 0 writes the adapter (the other rank nothing),
    equal as a whole to the one-process adapter (see above for why not elementwise)."""
    from nanoabsorber.benchdocs import make_fact_doc

    text = tmp_path / "doc.txt"
    text.write_text(make_fact_doc(4, 110, 3).text)
    outs = {}
    for n in (1, 2):
        out = outs[n] = tmp_path / f"p{n}.safetensors"
        launch = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                                      str(free_port())] if n > 1 else [])
        r = subprocess.run(launch + [str(ROOT / "absorb.py"), "--ckpt", str(tiny_ckpt), "--context", str(text),
                                     "--out", str(out), "--threads", "1", *RECIPE], cwd=tmp_path,
                           capture_output=True, text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("absorbed ") == 1                       # one summary: rank 0's
    a, b = load_file(outs[1]), load_file(outs[2])
    for k in a:                  # two windows of 4 Adam steps: the drift of the test above, twice over
        assert float((b[k] - a[k]).norm() / a[k].norm()) < 1e-2, k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.txt", "p1.safetensors", "p2.safetensors"]


# ----------------------------------------------------------------------------- memory options

def _absorb(model, cfg, seed=0):
    x, ys = ids(40, seed), [ids(20, seed + 1 + j) for j in range(3)]
    return absorb_chunk(model, [([], x, ys)], cfg)


def test_activation_checkpointing_gives_the_same_adapter():
    cfg = AbsorbConfig(steps=3, lr=1e-2, lora=LoRAConfig(rank=4, alpha=8), checkpoint_activations=False)
    outs = []
    for ck in (False, True):
        m = tiny(seed=1)
        apply_lora(m, cfg.lora)
        torch.manual_seed(0)
        for p in lora_parameters(m):
            p.data.normal_(0, 0.05)
        res = _absorb(m, AbsorbConfig(**{**cfg.__dict__, "checkpoint_activations": ck}))
        assert res.steps == 3 and m.grad_checkpointing is False             # switched off again afterwards
        outs.append((res.losses, lora_state_dict(m)))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-6)
    for k, v in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][k], v, atol=1e-6, rtol=1e-5)


def test_checkpointed_forward_has_the_same_gradients():
    m = tiny(seed=2)
    apply_lora(m, "all", 4, 8)
    for p in lora_parameters(m):
        p.data.normal_(0, 0.05)
    idx = torch.tensor([ids(17, 3)])
    grads = []
    for ck in (False, True):
        m.grad_checkpointing = ck
        m.zero_grad(set_to_none=True)
        _, hs = m(idx, hidden=True, logits=False)
        sum(h.square().mean() for h in hs).backward()
        grads.append([p.grad.clone() for p in lora_parameters(m)])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_bf16_base_keeps_fp32_lora_and_absorbs():
    ref = tiny(seed=4)
    m = tiny(seed=4).to(torch.bfloat16)
    apply_lora(ref, "all", 4, 8)
    apply_lora(m, "all", 4, 8)
    assert all(p.dtype == torch.float32 for p in lora_parameters(m))
    assert m.layers[0].attn.wq.weight.dtype == torch.bfloat16
    idx = torch.tensor([ids(12, 5)])
    with torch.no_grad():
        assert m(idx).dtype == torch.bfloat16
    cfg = AbsorbConfig(steps=6, lr=1e-2, lora=LoRAConfig(rank=4, alpha=8))
    res = _absorb(m, cfg)
    assert res.final_loss < res.first_loss                               # it learns in bf16
    assert all(p.dtype == torch.float32 for p in lora_parameters(m))     # fp32 weights and Adam state
    # the fp32 LoRA trained on the bf16 base, moved to the fp32 base, behaves the same there
    ref.load_state_dict({k: v.float() for k, v in lora_state_dict(m).items()}, strict=False)
    with torch.no_grad():
        lb, lf = m(idx).float(), ref(idx)
    assert (lb - lf).abs().max() < 0.05 * lf.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_lora_keeps_no_fp32_activations_and_the_fp32_gradient(dtype):
    """bf16/fp16 base: the LoRA product runs in the base dtype, so backward keeps no fp32 tensor of
    activation size (only the fp32 master weights, cast), and the gradients reaching the fp32
    weights are the fp32 computation's to the base dtype's precision."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40)
    ref = LoRALinear.from_linear(lin, rank=4, alpha=8)
    with torch.no_grad():
        ref.lora_B.normal_(0, 0.1)
    low = LoRALinear.from_linear(torch.nn.Linear(48, 40).to(dtype), rank=4, alpha=8)
    with torch.no_grad():
        low.weight.copy_(lin.weight)
        low.bias.copy_(lin.bias)
        low.lora_A.copy_(ref.lora_A)
        low.lora_B.copy_(ref.lora_B)
    assert low.lora_A.dtype == torch.float32
    x = torch.randn(3, 17, 48)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.numel())) or t, lambda t: t):
        y = low(x.to(dtype))
    big_fp32 = [n for d, n in saved if d == torch.float32 and n >= 3 * 17]
    assert big_fp32 == [], big_fp32                          # no fp32 copy of the input or the rank product
    assert y.dtype == dtype
    y.float().square().sum().backward()
    ref(x).square().sum().backward()
    for p_low, p_ref in ((low.lora_A, ref.lora_A), (low.lora_B, ref.lora_B)):
        assert p_low.grad.dtype == torch.float32
        err = (p_low.grad - p_ref.grad).abs().max() / p_ref.grad.abs().max()
        assert err < 0.03, err                                # bf16 carries 8 significant bits
