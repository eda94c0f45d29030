"""Checkpoint loading/saving: round trips, HF layouts (single, sharded), GGUF with llama.cpp's Q/K
permutation, dtype handling, and one-line errors for bad files."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nanoabsorber.checkpoint import CheckpointError, hf_state_dict, load_model, save_checkpoint
from nanoabsorber.gguf_convert import read_gguf, unpermute
from tests.test_model import tiny

ROOT = Path(__file__).resolve().parents[1]


def same_logits(a, b, atol=0.0):
    idx = torch.randint(0, a.cfg.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(a(idx), b(idx), atol=atol, rtol=atol)


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


def llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, written out independently."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.randn(6 * 8, 5).astype(np.float32)
    assert np.array_equal(unpermute(llama_cpp_permute(w, 6), 6), w)
    assert not np.array_equal(llama_cpp_permute(w, 6), w)


def write_gguf(m, path):
    import gguf

    c = m.cfg
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_vocab_size(c.vocab_size)
    inv = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for k, t in hf_state_dict(m).items():
        a = t.numpy()
        if k in inv:
            name = inv[k]
        else:
            i = k.split(".")[2]
            mid = ".".join(k.split(".")[3:-1])
            name = f"blk.{i}.{parts[mid]}.weight"
            if "q_proj" in k:
                a = llama_cpp_permute(a, c.n_heads)
            if "k_proj" in k:
                a = llama_cpp_permute(a, c.n_kv_heads)
        w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_reader_unpermutes(tmp_path, tie):
    m = tiny(n_heads=4, n_kv_heads=2, dim=32, tie=tie)
    write_gguf(m, tmp_path / "m.gguf")
    cfg, sd, _ = read_gguf(tmp_path / "m.gguf")
    assert cfg.tie_embeddings == tie and cfg.n_kv_heads == 2 and cfg.head_dim == 8
    m2, _ = load_model(tmp_path / "m.gguf")
    same_logits(m, m2, atol=1e-6)


# ------------------------------------------------------------------ bad input

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


def test_interrupted_gguf_conversion_leaves_nothing_that_loads(tmp_path, monkeypatch):
    import nanoabsorber.gguf_convert as gc
    import nanoabsorber.tokenizer as tk

    m = tiny()
    write_gguf(m, tmp_path / "m.gguf")

    class FakeTok:
        special_tokens, bos_id, eos_id, pad_id, add_bos, chat_template = {}, None, None, None, False, None

        def save_tokenizer_json(self, path):
            Path(path).write_text("{}")

    monkeypatch.setattr(tk.ByteBPETokenizer, "from_gguf", classmethod(lambda cls, r: FakeTok()))

    def boom(*a, **kw):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the weights were written

    monkeypatch.setattr(gc, "atomic_save_file", boom)
    out = tmp_path / "cache" / "converted"
    with pytest.raises(KeyboardInterrupt):
        gc.convert_gguf_to_dir(tmp_path / "m.gguf", out, log=lambda s: None)
    assert not out.exists() and list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(tk.ByteBPETokenizer, "from_gguf", classmethod(lambda cls, r: FakeTok()))
    gc.convert_gguf_to_dir(tmp_path / "m.gguf", out, log=lambda s: None)
    same_logits(m, load_model(out)[0], atol=1e-6)
