"""nanoabsorber.metrics against hand-computed values: the QA scores and the language-modelling
scores (log-probabilities, NLL, KL, recovered fraction, continuation_scores, position buckets)."""
import math

import pytest
import torch

from nanoabsorber import metrics
from nanoabsorber.metrics import target_logprobs
from tests.conftest import tiny

# ------------------------------------------------------------------------------------------
# Question answering
# ------------------------------------------------------------------------------------------


def test_normalize_answer_squad_style():
    assert metrics.normalize_answer("  The  Cat, sat.  ") == "cat sat"
    assert metrics.normalize_answer("An apple; a PEAR!") == "apple pear"
    assert metrics.normalize_answer("theory") == "theory"          # only whole-word articles go


def test_exact_match_uses_the_first_line_and_normalises():
    assert metrics.exact_match("The Cat.\nand more text", ["cat"])
    assert metrics.exact_match("\n\n  Drifi!  \n", ["drifi"])
    assert not metrics.exact_match("The cat is called Drifi.", ["Drifi"])   # strict: the line must be the answer
    assert metrics.exact_match("1887", ["1886", "1887"])
    assert not metrics.exact_match("", ["x"])


def test_lenient_match_is_containment():
    assert metrics.lenient_match("The cat is called Drifi.", ["drifi"])
    assert not metrics.lenient_match("The cat is called Dri.", ["Drifi"])


def test_token_f1_hand_examples():
    # pred {cat, sat}, gold {cat, sat, on, mat}: P = 1, R = 1/2, F1 = 2/3
    assert metrics.token_f1("the cat sat", ["cat sat on the mat"]) == pytest.approx(2 / 3)
    # pred {b x c d} vs gold {c d e}: overlap 2, P = 2/4, R = 2/3, F1 = 2 * (1/2 * 2/3) / (1/2 + 2/3) = 4/7
    assert metrics.token_f1("b x c d", ["c d e"]) == pytest.approx(4 / 7)
    # the article 'a' is dropped: pred {b c d}, P = R = 2/3
    assert metrics.token_f1("b a c d", ["c d e"]) == pytest.approx(2 / 3)
    assert metrics.token_f1("x y", ["z", "y x"]) == 1.0                      # best over accepted answers
    assert metrics.token_f1("x", ["y"]) == 0.0
    assert metrics.token_f1("x x y", ["x y y"]) == pytest.approx(2 / 3)     # multiset overlap: 2 of 3


def test_qa_scores_and_mean():
    s = metrics.qa_scores("Pepper\nis the cat", ["pepper"])
    # F1 over the whole prediction {pepper, is, cat} ('the' dropped): P = 1/3, R = 1, F1 = 1/2
    assert s["lenient"] == 1.0 and s["strict"] == 1.0 and s["f1"] == pytest.approx(1 / 2)
    assert metrics.mean([1.0, None, float("nan"), 0.0]) == 0.5
    assert math.isnan(metrics.mean([]))


# ------------------------------------------------------------------------------------------
# Language modelling
# ------------------------------------------------------------------------------------------

def test_token_nll_and_kl_of_known_distributions():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    nlls = metrics.token_nlls(p.log(), [9, 0, 2])          # the first target token has no row
    assert nlls.tolist() == pytest.approx([math.log(2), -math.log(0.7)])
    q = torch.tensor([[0.25, 0.25, 0.5], [0.1, 0.2, 0.7]])
    kl = metrics.token_kls(p.log(), q.log())
    assert kl[0].item() == pytest.approx(0.5 * math.log(2) + 0.25 * 0 + 0.25 * math.log(0.5))
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)


def test_recovered_fraction_and_buckets():
    assert metrics.recovered(3.0, 1.0, 2.5) == pytest.approx(0.25)
    assert metrics.recovered(3.0, 1.0, 1.0) == pytest.approx(1.0)
    assert metrics.recovered(3.0, 1.0, 3.5) == pytest.approx(-0.25)   # worse than no context
    assert math.isnan(metrics.recovered(2.0, 2.0, 1.0))
    means, starts = metrics.bucket_means([1, 2, 3, 4, 5, 6], 3)
    assert means == [1.5, 3.5, 5.5] and starts == [0, 2, 4]
    means, starts = metrics.bucket_means([1.0, 2.0], 5)                        # never more buckets than values
    assert means == [1.0, 2.0] and starts == [0, 1]


def test_uniform_model_has_nll_log_vocab_and_zero_kl():
    m = tiny(vocab=97)
    with torch.no_grad():
        m.output.weight.zero_()                       # logits 0: uniform over the vocabulary
    target = [5, 6, 7, 8, 9]
    a = metrics.lm_logprobs(m, [], [1, 2, 3], target)
    b = metrics.lm_logprobs(m, [], [], target)
    assert a.shape == b.shape == (4, 97)              # target[0] is skipped for every method
    assert metrics.token_nlls(a, target).tolist() == pytest.approx([math.log(97)] * 4)
    assert metrics.token_kls(a, b).abs().max().item() < 1e-6


def test_lm_logprobs_match_a_plain_forward():
    m = tiny(vocab=97)
    ctx, target = [3, 1, 4, 1, 5], [9, 2, 6, 5]
    logp = metrics.lm_logprobs(m, [7], ctx, target)
    seq = torch.tensor([[7] + ctx + target])
    ref = torch.log_softmax(m(seq)[0].float(), -1)[len(ctx) + 1:-1]     # positions predicting target[1:]
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)
    manual = -ref.gather(1, torch.tensor(target[1:])[:, None])[:, 0]
    torch.testing.assert_close(metrics.token_nlls(logp, target), manual)
    assert target_logprobs(m, [7], ctx, target).shape[0] == len(target)




def test_mean_nll_and_kl_align_at_the_end():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    assert metrics.nll(p.log(), [9, 0, 2]) == pytest.approx((math.log(2) - math.log(0.7)) / 2)
    q = torch.tensor([[0.2, 0.2, 0.6], [0.1, 0.2, 0.7]])
    # the longer (reference) tensor's first row is dropped: only the last rows are compared
    assert metrics.kl(torch.cat([q, p[1:]]).log(), p[1:].log()) == pytest.approx(0.0, abs=1e-7)
    assert metrics.kl(p.log(), q.log()) == pytest.approx(float(metrics.token_kls(p.log(), q.log()).mean()))


def test_continuation_scores_by_hand():
    # two positions, vocabulary 2; target[1:] = [0, 1]
    full = torch.tensor([[0.9, 0.1], [0.2, 0.8]]).log()
    none = torch.tensor([[0.5, 0.5], [0.5, 0.5]]).log()
    half = torch.tensor([[0.7, 0.3], [0.4, 0.6]]).log()
    s = metrics.continuation_scores({"full": full, "none": none, "absorbed": half}, [7, 0, 1])
    nll = {k: -(v[0, 0] + v[1, 1]).item() / 2 for k, v in (("full", full), ("none", none), ("absorbed", half))}
    for k in ("full", "none", "absorbed"):
        assert s[k]["nll"] == pytest.approx(nll[k])
    assert s["full"]["kl"] == pytest.approx(0.0, abs=1e-7) and s["none"]["kl"] > s["absorbed"]["kl"] > 0
    kl0 = 0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)
    kl1 = 0.2 * math.log(0.2 / 0.4) + 0.8 * math.log(0.8 / 0.6)
    assert s["absorbed"]["kl"] == pytest.approx((kl0 + kl1) / 2)
    assert s["full"]["recovered"] == pytest.approx(1.0) and s["none"]["recovered"] == pytest.approx(0.0)
    want = (nll["none"] - nll["absorbed"]) / (nll["none"] - nll["full"])
    assert s["absorbed"]["recovered"] == pytest.approx(want) and 0 < want < 1
    # other reference names, and a method with one more (leading) row: scored on the same tokens
    longer = torch.cat([torch.tensor([[0.01, 0.99]]).log(), half])
    t = metrics.continuation_scores({"ctx": full, "blank": none, "m": longer}, [7, 0, 1], full="ctx", none="blank")
    assert t["m"]["nll"] == pytest.approx(nll["absorbed"]) and t["m"]["recovered"] == pytest.approx(want)


def test_lenient_match_is_case_insensitive_containment():
    for pred, answers, want in [("The cat is Drifi.", ["drifi"], True), ("nothing", ["x", "y"], False),
                                ("Year 1887", ["1886", "1887"], True), ("", ["a"], False)]:
        assert metrics.lenient_match(pred, answers) == want


def test_nll_by_position_by_hand():
    curves = [torch.tensor([1.0, 2.0, 3.0, 2.0]), torch.tensor([3.0, 4.0, 1.0, 0.0])]
    pos = metrics.nll_by_position({"absorber": curves}, 2)
    assert pos["nll"]["absorber"] == [2.5, 1.5]          # segment means [2, 3, 2, 1], then pairs
    assert pos["bucket_starts"] == [1, 3] and pos["bucket_centers"] == [1.5, 3.5]


# ------------------------------------------------------------------------------------------
# The paper's test: recovered from KL, bootstrap intervals, per-layer distances
# ------------------------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def test_recovered_kl_by_hand():
    assert metrics.recovered_kl(0.4, 0.4) == 0.0 and metrics.recovered_kl(0.4, 0.0) == 1.0
    assert metrics.recovered_kl(0.4, 0.1) == pytest.approx(0.75) and metrics.recovered_kl(0.4, 0.8) == -1.0
    assert math.isnan(metrics.recovered_kl(0.0, 0.1))


@settings(max_examples=50, deadline=None)
@given(xs=st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=12), seed=st.integers(0, 99))
def test_bootstrap_interval_of_a_mean_lies_within_the_data(xs, seed):
    lo, hi = metrics.bootstrap_ci(xs, lambda r: sum(r) / len(r), n_boot=300, seed=seed)
    assert min(xs) - 1e-9 <= lo <= hi <= max(xs) + 1e-9
    assert metrics.bootstrap_ci(xs, lambda r: sum(r) / len(r), n_boot=300, seed=seed) == (lo, hi)   # seeded


def test_bootstrap_interval_of_constant_data_and_of_one_row():
    assert metrics.bootstrap_ci([2.5] * 5, lambda r: sum(r) / len(r)) == (2.5, 2.5)
    assert all(math.isnan(v) for v in metrics.bootstrap_ci([1.0], lambda r: r[0]))


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(0.01, 100), seed=st.integers(0, 99))
def test_layer_distances_are_zero_for_equal_states_and_scale_free(scale, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(4, 5, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    assert metrics.layer_distances(a, a) == [0.0] * 4
    d = metrics.layer_distances(a, b)
    assert d == pytest.approx(metrics.layer_distances(a * scale, b * scale), rel=1e-4)
    want = [float((b[l] - a[l]).abs().mean() / a[l].abs().mean()) for l in range(4)]
    assert d == pytest.approx(want, rel=1e-5)


def test_target_hidden_matches_a_plain_forward():
    m = tiny()
    prefix, ctx, tgt = [1], [5, 6, 7], [8, 9]
    h = metrics.target_hidden(m, prefix, ctx, tgt)
    with torch.no_grad():
        _, hs = m(torch.tensor([prefix + ctx + tgt]), hidden=True, logits=False)
    assert h.shape == (len(hs), 2, m.cfg.dim)
    torch.testing.assert_close(h, torch.stack([x[0, -2:] for x in hs]).float())
