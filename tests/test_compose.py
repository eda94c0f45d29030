"""nanoabsorber.lora.compose: adapters combined by concatenation along the rank, so the composed
update is the sum of the updates (any ranks and alphas); refusals for another base model or other
targets; sample.py takes --adapter more than once."""
import importlib.util
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nanoabsorber.cli import run
from nanoabsorber.errors import CheckpointError
from nanoabsorber.lora import (apply_lora, base_fingerprint, compose, load_adapter, lora_modules, lora_state_dict,
                               read_adapter, save_adapter, write_adapter)
from tests.conftest import ROOT, tiny


def adapter(seed: int, rank: int, alpha: float, targets="all", model_seed=0):
    """(tensors, metadata) of a random adapter on tiny(seed=model_seed), as read_adapter gives."""
    m = tiny(seed=model_seed)
    apply_lora(m, targets, rank, alpha)
    g = torch.Generator().manual_seed(seed)
    for mod in lora_modules(m):
        mod.lora_A.data = torch.randn(mod.lora_A.shape, generator=g) * 0.1
        mod.lora_B.data = torch.randn(mod.lora_B.shape, generator=g) * 0.1
    md = {"nanoabsorber.adapter": "1", "lora_config": json.dumps(m.lora_config), "base_fingerprint": base_fingerprint(m),
          "tokens_absorbed": "10"}
    deltas = {n: mod.delta_weight().detach() for n, mod in m.named_modules() if mod in lora_modules(m)}
    return (lora_state_dict(m), md), deltas


@settings(max_examples=8, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.sampled_from([1.0, 2.0, 8.0, 16.0])), min_size=1, max_size=3),
       st.integers(0, 1000), st.booleans())
def test_composed_delta_is_the_sum_of_deltas(specs, seed, weighted):
    parts = [adapter(seed + i, r, a) for i, (r, a) in enumerate(specs)]
    w = [0.5 + i for i in range(len(parts))] if weighted else [1.0] * len(parts)
    tensors, md = compose([p for p, _ in parts], weights=w if weighted else None)
    lc = json.loads(md["lora_config"])
    assert lc["rank"] == sum(r for r, _ in specs) and lc["alpha"] == lc["rank"]       # scale 1
    assert json.loads(md["tokens_absorbed"]) == 10 * len(specs)
    m = tiny()
    load_adapter(m, (tensors, md))
    for name, mod in m.named_modules():
        if mod in lora_modules(m):
            want = sum(wi * d[name] for wi, (_, d) in zip(w, parts))
            torch.testing.assert_close(mod.delta_weight().detach(), want, atol=1e-6, rtol=1e-5)
    # merged into the weights: the base plus the sum of the updates
    base, merged = tiny(), tiny()
    load_adapter(merged, (tensors, md), merge=True)
    for name, mod in merged.named_modules():
        if mod in lora_modules(merged):
            want = base.get_submodule(name).weight + sum(wi * d[name] for wi, (_, d) in zip(w, parts))
            torch.testing.assert_close(mod.weight, want, atol=1e-6, rtol=1e-5)


def test_compose_files_and_refusals(tmp_path):
    (t1, md1), _ = adapter(1, 4, 8.0)
    (t2, md2), _ = adapter(2, 2, 16.0)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_adapter(t1, md1, a)
    write_adapter(t2, md2, b)
    tensors, md = compose([a, b])
    out = write_adapter(tensors, md, tmp_path / "ab.safetensors")
    t3, md3 = read_adapter(out)                                            # a valid adapter file
    assert [p["name"] for p in json.loads(md3["composed_from"])] == ["a.safetensors", "b.safetensors"]
    assert t3["layers.0.attn.wq.lora_A"].shape[0] == 6
    # another base model, other targets: one-line CheckpointErrors naming the file
    (t4, md4), _ = adapter(3, 4, 8.0, model_seed=1)
    write_adapter(t4, md4, tmp_path / "other_base.safetensors")
    with pytest.raises(CheckpointError, match="other_base.safetensors: made for another base model"):
        compose([a, tmp_path / "other_base.safetensors"])
    (t5, md5), _ = adapter(4, 4, 8.0, targets="q,v")
    write_adapter(t5, md5, tmp_path / "qv.safetensors")
    with pytest.raises(CheckpointError, match="qv.safetensors: targets q,v differ"):
        compose([a, tmp_path / "qv.safetensors"])
    with pytest.raises(ValueError):
        compose([])


def test_save_adapter_of_a_bf16_model_is_fp32(tmp_path):
    m = tiny().to(torch.bfloat16)
    apply_lora(m, "q,v", 2, 4)
    t, _ = read_adapter(save_adapter(m, tmp_path / "x.safetensors"))
    assert all(v.dtype == torch.float32 for v in t.values())


def _sample_script():
    spec = importlib.util.spec_from_file_location("_sample_compose", ROOT / "sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sample_py_takes_several_adapters(tmp_path, capsys):
    from nanoabsorber import load
    from tests.conftest import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    paths = []
    for i, (r, a) in enumerate([(2, 4.0), (3, 3.0)]):
        m, _ = load(ckpt)
        apply_lora(m, "all", r, a)
        torch.manual_seed(i)
        for mod in lora_modules(m):
            mod.lora_B.data.normal_(0, 0.05)
        paths.append(save_adapter(m, tmp_path / f"a{i}.safetensors"))
    sample = _sample_script()
    args = ["--ckpt", str(ckpt), "--device", "cpu", "--prompt", "The", "--temperature", "0", "--max-new-tokens", "4"]
    assert sample.main(args + ["--adapter", str(paths[0]), "--adapter", str(paths[1])]) == 0
    cfg = sample.build(p := sample.build_parser(), sample.SampleConfig, p.parse_args(args + ["--adapter", "x"]))
    assert cfg.adapter == ["x"]
    assert sample.build(p, sample.SampleConfig, p.parse_args(args)).adapter == []
    # adapters that do not compose: one line, exit 2, before the model loads
    m, _ = load(ckpt)
    apply_lora(m, "q", 2, 4)
    bad = save_adapter(m, tmp_path / "q.safetensors")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(lambda: sample.main(args + ["--adapter", str(paths[0]), "--adapter", str(bad)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "targets q differ" in err[0], err
