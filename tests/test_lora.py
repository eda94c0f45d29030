"""LoRA invariants: init equals base exactly, merge/unmerge identity, only LoRA trains, adapter
round trip, wrong-base refusal, PEFT export layout."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from nanoabsorber.errors import CheckpointError
from nanoabsorber.lora import (LoRALinear, apply_lora, export_peft, load_adapter, lora_parameters, merge_lora,
                               save_adapter, unmerge_lora)
from tests.conftest import tiny


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@settings(max_examples=10, deadline=None)
@given(rank=st.integers(1, 8), alpha=st.floats(0.5, 64), targets=st.sets(
    st.sampled_from(["q", "k", "v", "o", "gate", "up", "down"]), min_size=1), seed=st.integers(0, 100))
def test_lora_at_init_equals_base_exactly(rank, alpha, targets, seed):
    m = tiny(seed=seed % 5)
    idx = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        before = m(idx)
        apply_lora(m, sorted(targets), rank, alpha)
        after = m(idx)
    assert torch.equal(before, after)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_lora_init_is_the_same_on_every_device(device):
    # A is drawn from the CPU generator whatever the device: one seed, one starting adapter
    def init(dev):
        torch.manual_seed(7)
        m = tiny(seed=0).to(dev)
        apply_lora(m, "all", 4, 8.0)
        return {k: v.cpu() for k, v in m.state_dict().items() if "lora_" in k}
    ref, got = init("cpu"), init(device)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert any(v.abs().sum() > 0 for k, v in ref.items() if "lora_A" in k)


@settings(max_examples=10, deadline=None)
@given(rank=st.integers(1, 8), seed=st.integers(0, 1000))
def test_merge_then_unmerge_is_identity(rank, seed):
    m = tiny()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    apply_lora(m, "all", rank, 2.0 * rank)
    perturb(m, seed)
    idx = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        unmerged_out = m(idx)
        merge_lora(m)
        merged_out = m(idx)
        assert not torch.allclose(m.layers[0].attn.wq.weight, base["layers.0.attn.wq.weight"])
        unmerge_lora(m)
    torch.testing.assert_close(merged_out, unmerged_out, atol=1e-5, rtol=1e-5)
    for k, v in base.items():
        torch.testing.assert_close(m.state_dict()[k], v, atol=1e-6, rtol=0)


def test_only_lora_receives_gradients():
    m = tiny()
    apply_lora(m, ["q", "v", "down"], 4, 8)
    perturb(m)
    m(torch.randint(0, 97, (1, 8))).sum().backward()
    for name, p in m.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert isinstance(m.layers[0].attn.wq, LoRALinear) and not isinstance(m.layers[0].attn.wk, LoRALinear)
    assert "layers.0.attn.wq.weight" in m.state_dict()  # the base weight keeps its key


def test_adapter_round_trip_and_wrong_base(tmp_path):
    m = tiny(seed=1)
    apply_lora(m, "all", 4, 8)
    perturb(m)
    f = save_adapter(m, tmp_path / "a.safetensors", tokens_absorbed=123, source_sha256="abc")
    idx = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        want = m(idx)
    fresh = tiny(seed=1)
    md = load_adapter(fresh, f)
    assert json.loads(md["tokens_absorbed"]) == 123 and md["source_sha256"] == "abc"
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), want)
    merged = tiny(seed=1)
    load_adapter(merged, f, merge=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), want, atol=1e-5, rtol=1e-5)
    other = tiny(seed=2)
    with pytest.raises(CheckpointError, match="another base model"):
        load_adapter(other, f)
    (tmp_path / "junk.safetensors").write_bytes(b"12345678")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_adapter(tiny(seed=1), tmp_path / "junk.safetensors")


def test_peft_export_layout(tmp_path):
    m = tiny()
    apply_lora(m, ["q", "up"], 4, 8)
    perturb(m)
    d = export_peft(m, tmp_path / "peft", base_model_name="/models/tiny")
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["q_proj", "up_proj"]
    assert cfg["base_model_name_or_path"] == "/models/tiny" and "modules_to_save" not in cfg
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight")
    assert len(keys) == 2 * 2 * m.cfg.n_layers
    assert torch.equal(a, m.layers[1].attn.wq.lora_A) and torch.equal(b, m.layers[1].mlp.up.lora_B)
    # PEFT semantics: W + (alpha/r) B A reproduces our merged weight
    w = m.layers[1].attn.wq.weight + (8 / 4) * m.layers[1].attn.wq.lora_B @ a
    merge_lora(m)
    torch.testing.assert_close(m.layers[1].attn.wq.weight, w)
