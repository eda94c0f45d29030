"""Tensor name maps: Hugging Face <-> ours is a bijection over every layer, GGUF -> HF is explicit."""
from hypothesis import given, strategies as st

from nanoabsorber.names import GGUF_MAP, NAME_MAP, hf_to_ours, ours_to_hf, rename


@given(st.sampled_from(sorted(NAME_MAP)), st.integers(0, 200), st.sampled_from(["weight", "bias"]))
def test_hf_ours_round_trip(template, layer, p):
    hf = template.format(i=layer, p=p)
    ours = hf_to_ours(hf)
    assert ours is not None and ours_to_hf(ours) == hf
    assert ("{i}" not in template) or f".{layer}." in ours


def test_unknown_names_map_to_none():
    assert hf_to_ours("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert rename("blk.3.attn_q.weight", GGUF_MAP) == "model.layers.3.self_attn.q_proj.weight"
    assert rename("blk.3.unknown.weight", GGUF_MAP) is None
