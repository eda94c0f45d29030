"""GGUF reading and conversion: llama.cpp's Q/K permutation undone, one parse per load, an
interrupted conversion leaves nothing that loads."""
from pathlib import Path

import numpy as np
import pytest

from nanoabsorber.checkpoint import hf_state_dict, load_model
from nanoabsorber.gguf_convert import read_gguf, unpermute
from tests.conftest import same_logits, tiny


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

    monkeypatch.setattr(gc, "atomic_save_safetensors", boom)
    out = tmp_path / "cache" / "converted"
    with pytest.raises(KeyboardInterrupt):
        gc.convert_gguf_to_dir(tmp_path / "m.gguf", out, log=lambda s: None)
    assert not out.exists() and list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(tk.ByteBPETokenizer, "from_gguf", classmethod(lambda cls, r: FakeTok()))
    gc.convert_gguf_to_dir(tmp_path / "m.gguf", out, log=lambda s: None)
    same_logits(m, load_model(out)[0], atol=1e-6)


def test_loading_a_gguf_parses_it_once(tmp_path, monkeypatch):
    import gguf

    from nanoabsorber import load

    m = tiny()
    write_gguf(m, tmp_path / "m.gguf")
    made = []
    real = gguf.GGUFReader

    class Counting(real):
        def __init__(self, *a, **kw):
            made.append(a)
            super().__init__(*a, **kw)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)

    def from_gguf(cls, path_or_reader):          # the real one parses again when given a path
        return gguf.GGUFReader(str(path_or_reader)) if isinstance(path_or_reader, (str, Path)) else path_or_reader

    import nanoabsorber.tokenizer as tk

    monkeypatch.setattr(tk.ByteBPETokenizer, "from_gguf", classmethod(from_gguf))
    model, tok = load(tmp_path / "m.gguf")
    same_logits(m, model, atol=1e-5)
    assert len(made) == 1 and isinstance(tok, Counting)
