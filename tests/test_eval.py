"""eval.py and nanoabsorber.evaluation: metrics against hand-computed values, the fact generator,
the JSONL loader's errors, the streaming-absorption windows, and eval.py end to end on a tiny
random checkpoint with a tiny SentencePiece tokenizer."""
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoabsorber import evaluation as ev
from nanoabsorber import load, save_checkpoint
from nanoabsorber.absorber import AbsorbConfig
from nanoabsorber.cli import run
from nanoabsorber.metrics import target_logprobs
from tests.test_model import tiny

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# QA metrics
# ------------------------------------------------------------------------------------------

def test_normalize_answer_squad_style():
    assert ev.normalize_answer("  The  Cat, sat.  ") == "cat sat"
    assert ev.normalize_answer("An apple; a PEAR!") == "apple pear"
    assert ev.normalize_answer("theory") == "theory"          # only whole-word articles go


def test_exact_match_uses_the_first_line_and_normalises():
    assert ev.exact_match("The Cat.\nand more text", ["cat"])
    assert ev.exact_match("\n\n  Drifi!  \n", ["drifi"])
    assert not ev.exact_match("The cat is called Drifi.", ["Drifi"])   # strict: the line must be the answer
    assert ev.exact_match("1887", ["1886", "1887"])
    assert not ev.exact_match("", ["x"])


def test_lenient_match_is_containment():
    assert ev.lenient_match("The cat is called Drifi.", ["drifi"])
    assert not ev.lenient_match("The cat is called Dri.", ["Drifi"])


def test_token_f1_hand_examples():
    # pred {cat, sat}, gold {cat, sat, on, mat}: P = 1, R = 1/2, F1 = 2/3
    assert ev.token_f1("the cat sat", ["cat sat on the mat"]) == pytest.approx(2 / 3)
    # pred {b x c d} vs gold {c d e}: overlap 2, P = 2/4, R = 2/3, F1 = 2 * (1/2 * 2/3) / (1/2 + 2/3) = 4/7
    assert ev.token_f1("b x c d", ["c d e"]) == pytest.approx(4 / 7)
    # the article 'a' is dropped: pred {b c d}, P = R = 2/3
    assert ev.token_f1("b a c d", ["c d e"]) == pytest.approx(2 / 3)
    assert ev.token_f1("x y", ["z", "y x"]) == 1.0                      # best over accepted answers
    assert ev.token_f1("x", ["y"]) == 0.0
    assert ev.token_f1("x x y", ["x y y"]) == pytest.approx(2 / 3)     # multiset overlap: 2 of 3


def test_qa_scores_and_mean():
    s = ev.qa_scores("Pepper\nis the cat", ["pepper"])
    # F1 over the whole prediction {pepper, is, cat} ('the' dropped): P = 1/3, R = 1, F1 = 1/2
    assert s["lenient"] == 1.0 and s["strict"] == 1.0 and s["f1"] == pytest.approx(1 / 2)
    assert ev.mean([1.0, None, float("nan"), 0.0]) == 0.5
    assert math.isnan(ev.mean([]))


# ------------------------------------------------------------------------------------------
# Language-modelling metrics
# ------------------------------------------------------------------------------------------

def test_token_nll_and_kl_of_known_distributions():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    nlls = ev.token_nlls(p.log(), [9, 0, 2])          # the first target token has no row
    assert nlls.tolist() == pytest.approx([math.log(2), -math.log(0.7)])
    q = torch.tensor([[0.25, 0.25, 0.5], [0.1, 0.2, 0.7]])
    kl = ev.token_kls(p.log(), q.log())
    assert kl[0].item() == pytest.approx(0.5 * math.log(2) + 0.25 * 0 + 0.25 * math.log(0.5))
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)


def test_recovered_fraction_and_buckets():
    assert ev.recovered_fraction(3.0, 1.0, 2.5) == pytest.approx(0.25)
    assert ev.recovered_fraction(3.0, 1.0, 1.0) == pytest.approx(1.0)
    assert ev.recovered_fraction(3.0, 1.0, 3.5) == pytest.approx(-0.25)   # worse than no context
    assert math.isnan(ev.recovered_fraction(2.0, 2.0, 1.0))
    means, starts = ev.bucket_means([1, 2, 3, 4, 5, 6], 3)
    assert means == [1.5, 3.5, 5.5] and starts == [0, 2, 4]
    means, starts = ev.bucket_means([1.0, 2.0], 5)                        # never more buckets than values
    assert means == [1.0, 2.0] and starts == [0, 1]


def test_lm_summary_and_nll_by_position_by_hand():
    per_token = {"full": [torch.tensor([1.0, 1.0, 1.0, 1.0])], "none": [torch.tensor([3.0, 3.0, 3.0, 3.0])],
                 "absorber": [torch.tensor([1.0, 2.0, 3.0, 2.0])]}
    segments = [{"methods": {"absorber": {"kl": 0.5, "absorb": {"seconds": 2.0, "tokens": 500}}}}]
    s = ev.lm_summary(segments, per_token, [ev.METHODS["absorber"]])["absorber"]
    assert s["nll"] == 2.0 and s["ppl"] == pytest.approx(math.exp(2.0)) and s["kl"] == 0.5
    assert s["recovered"] == pytest.approx(0.5) and s["absorb_seconds_per_1k_tokens"] == pytest.approx(4.0)
    pos = ev.nll_by_position({"absorber": per_token["absorber"] + [torch.tensor([3.0, 4.0, 1.0, 0.0])]}, 2)
    assert pos["nll"]["absorber"] == [2.5, 1.5]          # segment means [2, 3, 2, 1], then pairs
    assert pos["bucket_starts"] == [1, 3] and pos["bucket_centers"] == [1.5, 3.5]


def test_uniform_model_has_nll_log_vocab_and_zero_kl():
    m = tiny(vocab=97)
    with torch.no_grad():
        m.output.weight.zero_()                       # logits 0: uniform over the vocabulary
    target = [5, 6, 7, 8, 9]
    a = ev.lm_logprobs(m, [], [1, 2, 3], target)
    b = ev.lm_logprobs(m, [], [], target)
    assert a.shape == b.shape == (4, 97)              # target[0] is skipped for every method
    assert ev.token_nlls(a, target).tolist() == pytest.approx([math.log(97)] * 4)
    assert ev.token_kls(a, b).abs().max().item() < 1e-6


def test_lm_logprobs_match_a_plain_forward():
    m = tiny(vocab=97)
    ctx, target = [3, 1, 4, 1, 5], [9, 2, 6, 5]
    logp = ev.lm_logprobs(m, [7], ctx, target)
    seq = torch.tensor([[7] + ctx + target])
    ref = torch.log_softmax(m(seq)[0].float(), -1)[len(ctx) + 1:-1]     # positions predicting target[1:]
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)
    manual = -ref.gather(1, torch.tensor(target[1:])[:, None])[:, 0]
    torch.testing.assert_close(ev.token_nlls(logp, target), manual)
    assert target_logprobs(m, [7], ctx, target).shape[0] == len(target)


def test_absorb_dropped_never_trains_on_the_evaluated_text(monkeypatch):
    seen = []
    monkeypatch.setattr(ev, "absorb_chunk", lambda model, groups, cfg, log=None: seen.append(groups) or "r")
    ids = list(range(100, 120))                       # 20 tokens; the window keeps the last 5
    res = ev.absorb_dropped(None, ids, 5, AbsorbConfig(chunk=6, sync_len=4), prefix=[1])
    assert res == ["r", "r", "r"]
    xs = [g[0][1] for g in seen]
    ys = [g[0][2] for g in seen]
    assert xs == [ids[0:6], ids[6:12], ids[12:15]]    # the dropped text, tiled
    assert ys == [[ids[6:10]], [ids[12:16]], [ids[15:19]]]
    assert all(g[0][0] == [1] for g in seen)
    assert max(t for y in ys for t in y[0]) < 120     # nothing after the given ids
    assert ev.absorb_dropped(None, ids, 20, AbsorbConfig()) == []


def test_kv_cache_bytes_matches_the_cache():
    m = tiny()
    assert ev.kv_cache_bytes(m.cfg, 50, 4) == m.new_cache(1, 50).nbytes()


def test_peak_memory_sees_an_allocation():
    with ev.PeakMemory("cpu") as mem:
        x = torch.ones(64 * 2 ** 20 // 4)             # 64 MiB, touched
        x += 1
    del x
    if mem.hwm_reset:
        assert mem.extra >= 48 * 2 ** 20
    assert mem.peak >= mem.start > 0


# ------------------------------------------------------------------------------------------
# Generated documents
# ------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10 ** 6), n_tokens=st.sampled_from([20, 60, 150]), n_facts=st.integers(1, 7))
def test_fact_questions_are_answerable_from_their_document(seed, n_tokens, n_facts):
    doc = ev.make_fact_doc(seed, n_tokens, n_facts)
    assert ev.word_count(doc.text) >= n_tokens == n_tokens and doc.n_tokens == ev.word_count(doc.text)
    assert len(doc.facts) == n_facts
    for f in doc.facts:
        assert f.sentence in doc.text
        assert all(a in f.sentence for a in f.answers)  # the answer occurs in the document, in its fact
        assert f.position in ev.POSITIONS and f.question.endswith("?")
    assert len({f.question for f in doc.facts}) == n_facts
    # positions: beginning facts in the first paragraph block, end facts in the last
    paras = doc.text.split("\n\n")
    for f in doc.facts:
        i = next(k for k, p in enumerate(paras) if f.sentence in p)
        if f.position == "beginning":
            assert i < sum(1 for g in doc.facts if g.position == "beginning")
        if f.position == "end":
            assert i >= len(paras) - sum(1 for g in doc.facts if g.position == "end")


def test_fact_docs_are_deterministic_and_differ_per_seed():
    a, b, c = ev.make_fact_doc(3, 200, 6), ev.make_fact_doc(3, 200, 6), ev.make_fact_doc(4, 200, 6)
    assert a.text == b.text and [f.question for f in a.facts] == [f.question for f in b.facts]
    assert a.text != c.text and [f.answers for f in a.facts] != [f.answers for f in c.facts]
    assert [f.position for f in a.facts] == ["beginning", "middle", "end"] * 2


def test_fact_doc_length_follows_the_count_function_and_filler_has_no_entities():
    from nanoabsorber.probes import entities

    doc = ev.make_fact_doc(1, 300, 3, count=len)    # characters as "tokens"
    assert len(doc.text) >= 300
    fillers = " ".join(ev.filler_paragraph(__import__("random").Random(k)) for k in range(20))
    assert entities(fillers) == []
    story = ev.make_story(0, 120)
    assert ev.word_count(story) >= 120 and story == ev.make_story(0, 120) and story != ev.make_story(1, 120)


# ------------------------------------------------------------------------------------------
# JSONL tasks
# ------------------------------------------------------------------------------------------

def test_load_tasks_reads_strings_and_lists(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"context": "a b", "question": "q?", "answer": "x"}\n\n'
                 '{"context": "c", "question": "r?", "answer": ["y", "z"], "id": 7}\n')
    tasks = ev.load_tasks(f)
    assert [t["answers"] for t in tasks] == [["x"], ["y", "z"]]
    assert [t["line"] for t in tasks] == [1, 3] and tasks[1]["id"] == 7


@pytest.mark.parametrize("line, problem", [
    ('{"context": "c", "question": "q"', "not valid JSON"),
    ('["c", "q", "a"]', "expected a JSON object"),
    ('{"context": "c", "answer": "a"}', "missing key(s) question"),
    ('{"context": "", "question": "q", "answer": "a"}', "'context' must be a non-empty string"),
    ('{"context": "c", "question": "q", "answer": 3}', "'answer' must be"),
    ('{"context": "c", "question": "q", "answer": []}', "'answer' must be"),
])
def test_load_tasks_names_file_and_line(tmp_path, line, problem):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"context": "c", "question": "q", "answer": "a"}\n' + line + "\n")
    with pytest.raises(ev.TaskFileError) as e:
        ev.load_tasks(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}:2: ") and problem in msg and "\n" not in msg


def test_load_tasks_empty_and_missing_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ev.TaskFileError, match="no tasks"):
        ev.load_tasks(tmp_path / "e.jsonl")
    with pytest.raises(ev.TaskFileError, match="no such file"):
        ev.load_tasks(tmp_path / "nope.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b'{"context": "c", "question": "q", "answer": "a"}\n\xff\xfe\n')
    with pytest.raises(ev.TaskFileError, match=r"b.jsonl:2: not UTF-8"):
        ev.load_tasks(tmp_path / "b.jsonl")


# ------------------------------------------------------------------------------------------
# eval.py end to end on a tiny checkpoint
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tinyckpt")
    lines = [p for k in range(30) for p in ev.make_fact_doc(k, 80, 4).text.split("\n\n")]
    lines += ev.make_story(0, 2000).split("\n\n")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), vocab_size=512, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    m = tiny(vocab=512, dim=32, layers=2)
    m.cfg.max_seq_len = 2048
    save_checkpoint(m, folder)
    return folder


def _run_eval(args: list) -> subprocess.CompletedProcess:
    """eval.py as a program, in a fresh process."""
    return subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NANOABSORBER_QUIET": "1"})


def _main(args: list, capsys) -> tuple:
    """eval.py's main through cli.run, in this process: (exit status, stdout, stderr)."""
    eval_py = importlib.import_module("eval")
    with pytest.raises(SystemExit) as e:
        run(lambda: eval_py.main(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


SMALL = ["--context", "96", "--eval-len", "32", "--window", "32", "--buckets", "4", "--fact-lengths", "48,96",
         "--facts-per-doc", "3", "--fact-docs", "1", "--steps", "2", "--answer-tokens", "6", "--chunk", "64",
         "--sync-len", "32", "--cost-lengths", "64,128", "--cost-tokens", "64", "--cost-steps", "1",
         "--decode-tokens", "3", "--threads", "1", "--device", "cpu"]


def test_eval_end_to_end_on_a_tiny_checkpoint(tiny_ckpt, tmp_path, capsys):
    model, tok = load(tiny_ckpt)
    assert tok.vocab_size == 512 and model.cfg.max_seq_len == 2048
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps({"context": ev.make_fact_doc(50 + k, 60, 1).text, "question": q.question,
                                           "answer": q.answers})
                               for k in range(2) for q in ev.make_fact_doc(50 + k, 60, 1).facts) + "\n")
    out = tmp_path / "out"
    code, stdout, stderr = _main(["--ckpt", str(tiny_ckpt), "--out", str(out), "--tasks", str(tasks),
                                  "--only", "lm,facts,tasks", *SMALL], capsys)
    assert code == 0, stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    names = list(ev.METHODS)
    assert list(res["lm"]["summary"]) == names
    assert list(res["facts"]["summary"]) == names and list(res["tasks"]["summary"]) == names
    lm = res["lm"]["summary"]
    assert lm["full"]["kl"] == pytest.approx(0.0, abs=1e-6) and lm["full"]["recovered"] == pytest.approx(1.0)
    assert lm["none"]["recovered"] == pytest.approx(0.0, abs=1e-9)
    assert all(lm[n]["absorb_seconds_per_1k_tokens"] > 0 for n in ("absorber", "ntp", "kl", "hybrid"))
    assert set(res["lm"]["position"]["nll"]) == set(names) and len(res["lm"]["position"]["bucket_centers"]) == 4
    facts = res["facts"]
    assert len(facts["rows"]) == 2 * 3 * len(names)                      # 2 docs x 3 facts x methods
    assert set(facts["summary"]["full"]["by_length"]) == {"48", "96"}
    assert set(facts["summary"]["full"]["by_position"]) == set(ev.POSITIONS)
    assert res["tasks"]["n_tasks"] == 2 and len(res["tasks"]["rows"]) == 2 * len(names)
    env = res["environment"]
    assert env["torch"] == torch.__version__ and env["python"] and "git_commit" in env
    assert res["config"]["steps"] == 2 and res["absorb_config"]["ntp"]["objective"] == "ntp"
    assert res["absorb_config"]["absorber"]["loss"] == "l1" and res["absorb_config"]["hybrid"]["loss"] == "hybrid"
    for png in ("lm_nll_position.png", "facts_accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert md in stdout and "Absorber (L1 sync)" in md and "exact match" in md and "| len 96 |" in md


def test_eval_cost_as_a_program(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    r = _run_eval(["--ckpt", str(tiny_ckpt), "--out", str(out), "--only", "cost", "--methods", "full,absorber", *SMALL])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in res["cost"]["absorb"]] == ["absorber"]
    a = res["cost"]["absorb"][0]
    assert a["steps"] == 1 and a["seconds"] > 0 and a["memory_peak_bytes"] >= a["memory_start_bytes"] > 0
    inf = res["cost"]["inference"]
    assert {(r["context_tokens"], r["mode"]) for r in inf} == {(64, "full"), (64, "absorbed"), (128, "full"),
                                                               (128, "absorbed")}
    cfg = load(tiny_ckpt, tokenizer=False)[0].cfg
    full128 = next(r for r in inf if r["context_tokens"] == 128 and r["mode"] == "full")
    assert full128["tokens_in_window"] == 128 and full128["kv_cache_bytes"] == ev.kv_cache_bytes(cfg, 131, 4)
    assert all(r["tokens_in_window"] == 32 and r["decode_ms_per_token"] > 0 for r in inf if r["mode"] == "absorbed")
    assert (out / "cost_memory_latency.png").read_bytes()[:4] == b"\x89PNG"
    assert "KV cache MiB" in r.stdout and "decode ms / tok" in r.stdout


def test_eval_only_lm_on_a_document(tiny_ckpt, tmp_path, capsys):
    doc = tmp_path / "book.txt"
    doc.write_text(ev.make_story(7, 600))
    code, _, err = _main(["--ckpt", str(tiny_ckpt), "--only", "lm", "--methods", "window,absorber",
                          "--out", str(tmp_path / "o"), "--docs", str(doc), *SMALL], capsys)
    assert code == 0, err[-2000:]
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert "facts" not in res and "cost" not in res
    lm = res["lm"]["summary"]
    assert list(lm) == ["window", "absorber"] and list(res["lm"]["position"]["nll"]) == ["window", "absorber"]
    assert all(isinstance(lm[n]["recovered"], float) for n in lm)   # references measured even if not selected
    assert res["lm"]["documents"] == [{"name": "book.txt", "segments": 2}]   # full preset: 2 per document


def test_eval_bad_input_is_one_line_and_exit_2(tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c", "question": "q", "answer": "a"}\n{oops\n')
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")
    for args, msg in [(["--tasks", str(bad), "--only", "tasks"], f"{bad}:2: not valid JSON"),
                      (["--only", "tasks"], "--only tasks needs --tasks"),
                      (["--only", "lm,speed"], "unknown section(s) ['speed']"),
                      (["--methods", "full,magic"], "unknown method(s) ['magic']"),
                      (["--docs", str(tmp_path / "missing.txt"), "--only", "lm"], "missing.txt: no such file"),
                      (["--docs", str(short), "--only", "lm", *SMALL], "short.txt: too short"),
                      (["--window", "200", "--context", "100"], "--window (200) must be smaller"),
                      (["--fact-lengths", "12,x"], "--fact-lengths: expected a comma list of integers")]:
        code, _, err = _main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "o2"), *args], capsys)
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("error")]
        assert code == 2 and len(lines) == 1 and msg in lines[0], (args, err)
        assert "Traceback" not in err
