"""Checkpoint loading/saving: round trips, HF layouts (single, sharded), GGUF with llama.cpp's Q/K
permutation, dtype handling, and one-line errors for bad files."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from nanoabsorber.checkpoint import CheckpointError, hf_state_dict, load_model, save_checkpoint
from tests.conftest import ROOT, same_logits, tiny

@pytest.mark.parametrize("tie", [False, True])
def test_own_checkpoint_round_trip(tmp_path, tie):
    m = tiny(tie=tie)
    f = save_checkpoint(m, tmp_path / "m.safetensors", extra_metadata={"step": 7})
    m2, folder = load_model(f)
    assert folder == tmp_path and m2.cfg == m.cfg
    same_logits(m, m2)
    if tie:
        assert m2.output.weight is m2.embed.weight


def test_hf_directory_and_shards(tmp_path):
    m = tiny()
    d = save_checkpoint(m, tmp_path / "single").parent
    assert (d / "config.json").exists()
    same_logits(m, load_model(d)[0])
    # sharded: split the HF-named tensors into two files plus an index
    sd = hf_state_dict(m)
    names = sorted(sd)
    shard = tmp_path / "sharded"
    shard.mkdir()
    wm = {}
    for i, part in enumerate([names[::2], names[1::2]]):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, shard / fname)
        wm.update({k: fname for k in part})
    (shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    (shard / "config.json").write_text((d / "config.json").read_text())
    same_logits(m, load_model(shard)[0])


@pytest.mark.parametrize("store", [torch.bfloat16, torch.float16])
def test_dtype_handling(tmp_path, store):
    m = tiny()
    f = save_checkpoint(m, tmp_path / "m.safetensors", dtype=store)
    m32, _ = load_model(f, dtype=torch.float32)
    assert m32.embed.weight.dtype == torch.float32
    assert torch.equal(m32.embed.weight, m.embed.weight.to(store).float())
    mb, _ = load_model(f, dtype=torch.bfloat16)
    assert mb.layers[0].attn.wq.weight.dtype == torch.bfloat16
    idx = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        assert torch.isfinite(mb(idx)).all()


def expect_error(path, match):
    with pytest.raises(CheckpointError, match=match) as e:
        load_model(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "no such file")


def test_truncated_and_corrupt(tmp_path):
    f = save_checkpoint(tiny(), tmp_path / "m.safetensors")
    data = f.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "t.safetensors", "safetensors")
    (tmp_path / "g.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    expect_error(tmp_path / "g.safetensors", "safetensors")
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    expect_error(tmp_path / "x.gguf", "GGUF")


def test_wrong_shape_and_config_mismatch(tmp_path):
    m = tiny()
    sd = hf_state_dict(m)
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(5, 5)
    d = tmp_path / "bad"
    d.mkdir()
    save_file(sd, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(m.cfg.to_hf()))
    expect_error(d, "up_proj.*shape")
    cfg = m.cfg.to_hf()
    cfg["num_hidden_layers"] = 3
    d2 = tmp_path / "mismatch"
    d2.mkdir()
    save_file(hf_state_dict(m), d2 / "model.safetensors")
    (d2 / "config.json").write_text(json.dumps(cfg))
    expect_error(d2, "missing tensor .*layers.2")
    (d2 / "config.json").write_text("{not json")
    expect_error(d2, "JSON")


def test_pickle_refused_and_unknown(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\x80\x04")
    expect_error(tmp_path / "w.bin", "pickle")
    (tmp_path / "w.txt").write_text("hi")
    expect_error(tmp_path / "w.txt", "expected")
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", "no model.safetensors")


def test_cli_bad_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 10)
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(bad), "--max-new-tokens", "1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and str(bad) in err[0] and "Traceback" not in r.stderr

