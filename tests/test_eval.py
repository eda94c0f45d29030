"""eval.py: its settings (one source per setting, presets, one-line errors for every flag), the
LM summary and the streaming-absorption windows, and eval.py end to end on a tiny random
checkpoint with a tiny SentencePiece tokenizer."""
import importlib
import json
import math
import os
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

from nanoabsorber import load
from nanoabsorber.absorber import AbsorbConfig
from nanoabsorber.benchdocs import POSITIONS, make_fact_doc, make_story
from nanoabsorber.cli import RunConfig, run
from nanoabsorber.lora import LoRAConfig
from nanoabsorber.model import kv_cache_bytes

ROOT = Path(__file__).resolve().parents[1]
ev = importlib.import_module("eval")


# ------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------

def _parse(argv):
    return ev.parse(ev.build_parser(), argv)


def test_presets_fill_the_sizes_and_an_explicit_flag_wins():
    run_cfg, cfg, base = _parse([])
    assert cfg.context == 2048 and cfg.fact_lengths == "256,512,1024" and cfg.only == "lm,facts,long,cost"
    assert base.steps == AbsorbConfig().steps == cfg.steps and base.batch_tokens == AbsorbConfig().batch_tokens
    _, cfg, base = _parse(["--quick", "--steps", "3", "--tasks", "t.jsonl"])
    assert cfg.context == 1024 and cfg.answer_tokens == 16 and cfg.cost_steps == 1
    assert base.steps == 3 == cfg.steps and base.batch_tokens == 128
    assert cfg.sections() == ["lm", "facts", "long", "tasks", "cost"] and cfg.long_lengths == "768"
    _, cfg, _ = _parse(["--only", "cost,lm"])
    assert cfg.sections() == ["lm", "cost"]                     # canonical order


def test_recipe_and_model_flags_come_from_their_dataclasses():
    """One source of truth: every AbsorbConfig / LoRAConfig / RunConfig setting not set per method
    or by the preset is a flag with the dataclass's default."""
    run_cfg, cfg, base = _parse(["--device", "cpu"])
    assert base == AbsorbConfig(steps=cfg.steps, batch_tokens=cfg.batch_tokens)
    assert run_cfg == RunConfig(device="cpu") and run_cfg.threads is None
    flags = {o for a in ev.build_parser()._actions for o in a.option_strings}
    # objective and loss are set per method; steps and batch_tokens are sizes with preset defaults
    for cls, absent in ((AbsorbConfig, ("objective", "loss", "lora")), (LoRAConfig, ()), (RunConfig, ())):
        for f in fields(cls):
            assert (f"--{f.name.replace('_', '-')}" in flags) == (f.name not in absent), f.name
    _, _, base = _parse(["--rank", "4", "--alpha", "8", "--targets", "q,v", "--lr", "0.01", "--probes", ""])
    assert base.lora == LoRAConfig(rank=4, alpha=8.0, targets="q,v") and base.lr == 0.01 and base.probes == ""
    _, _, base = _parse(["--steps", "0"])
    assert base.steps == 0


def test_methods_in_canonical_order_and_their_configs():
    assert [m.name for m in ev.selected_methods("hybrid, full,absorber")] == ["full", "absorber", "hybrid"]
    base = AbsorbConfig(steps=7)
    assert ev.method_config(base, ev.METHODS["ntp"]).objective == "ntp"
    kl = ev.method_config(base, ev.METHODS["kl"])
    assert (kl.objective, kl.loss, kl.steps) == ("sync", "kl", 7)


def _invalid_values(tmp_path) -> dict:
    """An invalid value for every flag of eval.py."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"context": "c", "question": "q", "answer": "a"}\n{oops\n')
    missing = str(tmp_path / "missing.txt")
    v = {"--ckpt": [missing], "--device": ["tpu"], "--dtype": ["int3"], "--attn": ["magic"], "--threads": ["0"],
         "--quick": None, "--only": ["lm,speed"], "--methods": ["full,magic"], "--out": [str(a_file)],
         "--tasks": [str(bad_jsonl)], "--tasks-limit": ["-1"], "--context": ["0"], "--eval-len": ["-5"],
         "--window": ["-1"], "--lm-segments": ["0"], "--buckets": ["0"], "--fact-lengths": ["12,x"],
         "--facts-per-doc": ["0"], "--fact-docs": ["0"], "--answer-tokens": ["0"], "--cost-lengths": ["0"],
         "--cost-tokens": ["0"], "--cost-steps": ["-1"], "--decode-tokens": ["0"], "--steps": ["-1"],
         "--batch-tokens": ["-1"], "--docs": [missing], "--kl-weight": ["-1"], "--temperature": ["0"],
         "--eps": ["-1"], "--lr": ["0"], "--schedule": ["linear"], "--weight-decay": ["-1"], "--grad-clip": ["-1"],
         "--chunk": ["0"], "--sync-len": ["-1"], "--gen-tokens": ["-1"], "--gen-temperature": ["0"],
         "--gen-top-p": ["2"], "--gen-samples": ["0"], "--gen-points": ["0"], "--sink-positions": ["-1"], "--probes": ["nonsense"], "--rank": ["0"], "--alpha": ["0"],
         "--targets": ["q,zz"], "--dropout": ["1.5"], "--seed": ["x"], "--long-lengths": ["0"],
         "--long-styles": ["poems"], "--long-docs": ["0"], "--long-questions": ["x"], "--long-refs": ["oracle"],
         "--checkpoint-activations": None, "--teacher": ["teachers"], "--epochs": ["-1"], "--replay": ["-2"],
         "--replay-share": ["0.95"],
         "--micro-tokens": ["0"]}
    return v


def test_every_flag_rejects_an_invalid_value_in_one_line_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ev, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    values = _invalid_values(tmp_path)
    actions = [a for a in ev.build_parser()._actions if a.option_strings != ["-h", "--help"]]
    assert {a.option_strings[0] for a in actions} == set(values)      # a new flag needs an invalid value here
    for flag, value in values.items():
        argv = [f"{flag}=yes"] if value is None else [flag, *value]
        with pytest.raises(SystemExit) as e:
            ev.main(argv + ["--out", str(tmp_path / "o")] * (flag != "--out"))
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, (flag, err)
        assert err.startswith("eval.py: error: ") and "Traceback" not in err, (flag, err)


@pytest.mark.parametrize("argv, msg", [
    (["--only", "tasks"], "argument --only: the tasks section needs --tasks"),
    (["--only", "lm,speed"], "argument --only: unknown 'speed'"),
    (["--methods", ""], "argument --methods: must not be empty"),
    (["--window", "200", "--context", "100"], "argument --window: must be smaller than --context (100), not 200"),
    (["--quick", "--window", "2000"], "argument --window: must be smaller than --context (1024), not 2000"),
    (["--context", "100"], "argument --window: must be smaller than --context (100), not 256"),
    (["--fact-lengths", "12,x"], "argument --fact-lengths: expected a comma list of integers"),
    (["--cost-lengths", "64,-1"], "argument --cost-lengths: expected positive integers"),
])
def test_bad_combinations_name_the_flag(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------------------
# Language modelling: summary and streaming absorption
# ------------------------------------------------------------------------------------------

def _seg(nll, kl, layers=(0.0, 0.0), absorb=None):
    return {"nll": nll, "kl": kl, "layers": list(layers), "absorb": absorb}


def test_lm_summary_by_hand():
    segments = [{"methods": {"full": _seg(1.0, 0.0), "none": _seg(3.0, 1.0, (0.0, 1.0)),
                             "absorber": _seg(2.0, 0.5, (0.0, 0.5), {"seconds": 2.0, "tokens": 500})}},
                {"methods": {"full": _seg(1.0, 0.0), "none": _seg(3.0, 3.0, (0.0, 1.0)),
                             "absorber": _seg(2.0, 0.5, (0.0, 0.3), {"seconds": 2.0, "tokens": 500})}}]
    s = ev.lm_summary(segments, [ev.METHODS["none"], ev.METHODS["absorber"]])
    a = s["absorber"]
    assert a["nll"] == 2.0 and a["ppl"] == pytest.approx(math.exp(2.0)) and a["kl"] == 0.5
    assert a["recovered"] == pytest.approx(1 - 0.5 / 2.0)            # a ratio of means over segments
    assert a["recovered_nll"] == pytest.approx(0.5) and a["absorb_seconds_per_1k_tokens"] == pytest.approx(4.0)
    assert a["layers"] == pytest.approx([0.0, 0.4]) and a["segments"] == 2
    lo, hi = a["recovered_ci"]                 # resampling 2 segments: KL_none is 1, 2 or 3
    assert lo == pytest.approx(0.5) and hi == pytest.approx(1 - 0.5 / 3.0)
    assert s["none"]["recovered"] == 0.0 and s["none"]["kl_ci"] == (1.0, 3.0)


def test_absorb_dropped_never_trains_on_the_evaluated_text(monkeypatch):
    import nanoabsorber.absorber as ab
    seen = []
    monkeypatch.setattr(ab, "absorb_chunk", lambda model, groups, cfg, log=None, **kw: seen.append(groups) or ab.ChunkResult(
        1, 0.0, 0.0))
    monkeypatch.setattr(ab, "sample_continuations", lambda model, ctx, n, per, *a, **k: [[7] * per] * n)
    ids = list(range(100, 120))                       # 20 tokens; the window keeps the last 5
    cfg = AbsorbConfig(chunk=6, sync_len=4, gen_tokens=0)
    res = ev.absorb_dropped(None, ids, 5, cfg, prefix=[1])
    assert len(res) == 3
    xs = [g[0][1] for g in seen]
    ys = [g[0][2] for g in seen]
    assert xs == [ids[0:6], ids[6:12], ids[12:15]]    # the dropped text, tiled
    assert ys == [[ids[6:10]], [ids[12:16]], [ids[15:19]]]
    assert all(g[0][0] == [1] for g in seen)
    assert max(t for y in ys for t in y[0]) < 120     # nothing after the given ids
    assert ev.absorb_dropped(None, ids, 20, AbsorbConfig()) == []
    # W = 0: all of ids absorbed; the last window's Y is teacher-generated only (the real text after
    # it is the evaluated one), with gen_points = 2 half the samples start inside the window
    seen.clear()
    ev.absorb_dropped(None, ids, 0, replace(cfg, chunk=10, sync_len=4, gen_tokens=8, gen_samples=4, gen_points=2))
    last = seen[-1]
    assert [g[1] for g in last] == [ids[10:20], ids[10:15]]
    assert last[0][2] == [[7, 7]] * 2 and last[1][2] == [[7, 7]] * 2
    assert all(t < 120 or t == 7 for g in last for y in g[2] for t in y)


# ------------------------------------------------------------------------------------------
# eval.py end to end on a tiny checkpoint
# ------------------------------------------------------------------------------------------

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
    tasks.write_text("\n".join(json.dumps({"context": make_fact_doc(50 + k, 60, 1).text, "question": q.question,
                                           "answer": q.answers})
                               for k in range(2) for q in make_fact_doc(50 + k, 60, 1).facts) + "\n")
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
    assert lm["full"]["recovered_nll"] == pytest.approx(1.0) and lm["full"]["layers"] == pytest.approx([0.0] * 3)
    assert lm["none"]["layers"][0] == pytest.approx(0.0) and lm["none"]["layers"][-1] > 0   # depth 2 tiny model
    assert all(lm[n]["absorb_seconds_per_1k_tokens"] > 0 for n in ("absorber", "l1_norm", "ntp", "kl", "hybrid"))
    assert set(res["lm"]["position"]["nll"]) == set(names) and len(res["lm"]["position"]["bucket_centers"]) == 4
    facts = res["facts"]
    assert len(facts["rows"]) == 2 * 3 * len(names)                      # 2 docs x 3 facts x methods
    assert set(facts["summary"]["full"]["by_length"]) == {"48", "96"}
    assert set(facts["summary"]["full"]["by_position"]) == set(POSITIONS)
    assert res["tasks"]["n_tasks"] == 2 and len(res["tasks"]["rows"]) == 2 * len(names)
    env = res["environment"]
    assert env["torch"] == torch.__version__ and env["python"] and "git_commit" in env
    assert res["config"]["steps"] == 2 and res["absorb_config"]["ntp"]["objective"] == "ntp"
    assert res["absorb_config"]["absorber"]["loss"] == "l1" and res["absorb_config"]["hybrid"]["loss"] == "hybrid"
    for png in ("lm_nll_position.png", "lm_layers.png", "facts_accuracy.png"):
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
    assert full128["tokens_in_window"] == 128 and full128["kv_cache_bytes"] == kv_cache_bytes(cfg, 131, 4)
    assert all(r["tokens_in_window"] == 32 and r["decode_ms_per_token"] > 0 for r in inf if r["mode"] == "absorbed")
    assert (out / "cost_memory_latency.png").read_bytes()[:4] == b"\x89PNG"
    assert "KV cache MiB" in r.stdout and "decode ms / tok" in r.stdout


def test_eval_only_lm_on_a_document(tiny_ckpt, tmp_path, capsys):
    doc = tmp_path / "book.txt"
    doc.write_text(make_story(7, 600))
    code, _, err = _main(["--ckpt", str(tiny_ckpt), "--only", "lm", "--methods", "window,absorber",
                          "--out", str(tmp_path / "o"), "--docs", str(doc), *SMALL], capsys)
    assert code == 0, err[-2000:]
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert "facts" not in res and "cost" not in res
    lm = res["lm"]["summary"]
    assert list(lm) == ["window", "absorber"] and list(res["lm"]["position"]["nll"]) == ["window", "absorber"]
    assert all(isinstance(lm[n]["recovered"], float) for n in lm)   # references measured even if not selected
    assert res["lm"]["documents"] == [{"name": "book.txt", "segments": 2}]   # full preset: 2 per document


def test_eval_lm_with_no_window_per_document(tiny_ckpt, tmp_path, capsys):
    """W = 0: nothing of the context in the prompt; the absorbing method's Y is teacher-sampled
    only; per-document summaries with intervals over segments."""
    docs = []
    for k in range(2):
        docs.append(tmp_path / f"kind{k}.txt")
        docs[-1].write_text(make_story(20 + k, 900))
    code, _, err = _main(["--ckpt", str(tiny_ckpt), "--only", "lm", "--methods", "none,hybrid", "--out",
                          str(tmp_path / "o"), "--docs", *map(str, docs), *SMALL, "--window", "0",
                          "--lm-segments", "3", "--gen-tokens", "16", "--gen-samples", "2", "--chunk", "96"], capsys)
    assert code == 0, err[-2000:]
    lm = json.loads((tmp_path / "o" / "results.json").read_text())["lm"]
    assert list(lm["by_document"]) == ["kind0.txt", "kind1.txt"]
    for summary in [lm["summary"], *lm["by_document"].values()]:
        h = summary["hybrid"]
        assert h["segments"] in (3, 6) and h["recovered_ci"][0] <= h["recovered"] <= h["recovered_ci"][1]
        assert summary["none"]["recovered"] == 0.0
    absorbed = [s["methods"]["hybrid"]["absorb"] for s in lm["segments"]]
    assert all(a["tokens"] == 96 and a["windows"] == 1 and 0 < a["y_tokens"] <= 2 * 8 for a in absorbed)  # sampled Y only
    assert "**kind0.txt**" in (tmp_path / "o" / "results.md").read_text()


def test_eval_bad_input_is_one_line_and_exit_2(tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c", "question": "q", "answer": "a"}\n{oops\n')
    for args, msg in [(["--tasks", str(bad), "--only", "tasks"], f"{bad}:2: not valid JSON"),
                      (["--docs", str(tmp_path / "missing.txt"), "--only", "lm"], "missing.txt: no such file")]:
        code, _, err = _main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "o2"), *args], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and msg in err, (args, err)
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")        # too short is known once the tokenizer is loaded
    code, _, err = _main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "o2"), "--docs", str(short), "--only",
                          "lm", *SMALL], capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error")]
    assert code == 2 and len(lines) == 1 and "short.txt: too short" in lines[0] and "Traceback" not in err, err


def test_eval_long_documents_on_a_tiny_checkpoint(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "long"
    code, stdout, stderr = _main(["--ckpt", str(tiny_ckpt), "--out", str(out), "--only", "long", "--long-lengths",
                                  "300", "--long-styles", "catalogue,prose", "--long-questions", "4", "--chunk", "96",
                                  "--sync-len", "48", "--steps", "2", "--gen-tokens", "8", "--answer-tokens", "6",
                                  "--methods", "absorber,ntp"], capsys)
    assert code == 0, stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    long = res["long"]
    assert res["long"]["methods"] == ["full", "oracle_window", "oracle_passage", "last_window", "absorber", "ntp"]
    assert len(long["documents"]) == 2 and all(d["windows"] >= 3 for d in long["documents"])
    rows = long["rows"]
    questions = {(r["item"], r["question"]) for r in rows}
    assert len(rows) == 6 * len(questions) and len(questions) >= 4         # every method answers every question
    doc = long["documents"][0]["text"]
    for r in rows:
        assert doc.count(r["answers"][0]) <= 1 or r["item"] == 1          # every answer occurs once
        assert 0 <= r["window"] < long["documents"][r["item"]]["windows"] and r["third"] in POSITIONS
        assert ("fresh" in r) == (r["method"] in ("absorber", "ntp"))      # retention measured for absorbing methods
    s = long["summary"]
    assert set(s["absorber"]["retention"]) == {"right_after_its_window", "after_the_last_window",
                                               "window_1_right_after", "window_1_after_the_last"}
    assert s["absorber"]["absorb_seconds_per_1k_tokens"] > 0 and s["full"]["absorb_seconds_per_1k_tokens"] is None
    assert set(s["full"]["by_third"]) <= set(POSITIONS) and "sentence" in s["oracle_passage"]
    assert "### Long documents" in stdout and "Retention" in stdout
    assert (out / "long_recall_position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_long_questions_know_where_their_answer_is(tiny_ckpt):
    """The oracle window holds the answer, the oracle passage too, and the thirds follow the order."""
    from nanoabsorber import load

    _, tok = load(tiny_ckpt)
    cfg = replace(ev.EvalConfig(long_lengths="400", long_styles="prose", long_docs=1, long_questions=5), quick=False)
    items = ev.long_items(tok, cfg, AbsorbConfig(chunk=80, sync_len=40))
    qs = items[0]["questions"]
    assert [q["window"] for q in qs] == sorted(q["window"] for q in qs) and qs[0]["third"] == "beginning"
    assert qs[-1]["third"] == "end" and qs[-1]["window"] >= items[0]["windows"] - 2     # the last entry
    for q in qs:
        assert any(a in q["oracle_passage"] for a in q["answers"])
        assert any(a in q["oracle_window"] for a in q["answers"])


def test_continuation_frontier_pairs_segments_across_runs(tmp_path, capsys):
    """bench/continuation_frontier.py --versus: runs merged by (document, segment), paired KL
    differences computed by hand, and runs of other segments refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cf", Path(__file__).parents[1] / "bench" / "continuation_frontier.py")
    cf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cf)

    def run(name, kls, none=(1.0, 2.0, 1.0), window=0):
        segs = [{"document": d, "segment": i, "methods": {"none": {"kl": n}, "full": {"kl": 0.0},
                                                          **{m: {"kl": v[k]} for m, v in kls.items()}}}
                for k, ((d, i), n) in enumerate(zip([("a", 0), ("a", 1), ("b", 0)], none))]
        summ = {m: {"label": m, "recovered": 0.5, "recovered_ci": [0.4, 0.6], "absorb_seconds_per_1k_tokens": 1.0}
                for m in kls}
        res = {"config": {"window": window, "steps": 10}, "lm": {"segments": segs, "summary": summ,
               "by_document": {d: summ for d in "ab"}}}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
        return tmp_path / name / "results.json"

    r1 = run("r1", {"hybrid": [0.2, 0.5, 0.1]})
    r2 = run("r2", {"ntp": [0.4, 0.4, 0.3]})
    rows = cf.paired(cf.segments_by_window([r1, r2]), "hybrid")
    got = {(o, k): (n, round(m, 6), w) for _, o, k, n, m, _, w in rows}
    assert got[("ntp", "a")] == (2, round((0.2 - 0.1) / 2, 6), 1)
    assert got[("ntp", "b")] == (1, 0.2, 1)
    assert got[("ntp", "all")] == (3, round(0.3 / 3, 6), 2)
    assert got[("none", "all")] == (3, round((0.8 + 1.5 + 0.9) / 3, 6), 3)
    r4 = run("r4", {"ntp": [0.1, 0.6, 0.2]})                   # the same method in another run keeps its own name
    got = {(o, k): round(m, 6) for _, o, k, n, m, _, w in cf.paired(cf.segments_by_window([r1, r2, r4]), "hybrid")}
    assert got[("ntp", "all")] == round(0.3 / 3, 6) and got[("ntp@r4", "all")] == round(0.1 / 3, 6)
    assert cf.main([str(r1), str(r2), "--versus", "hybrid"]) == 0
    assert "| 0 | ntp | all | 3 | +0.100 |" in capsys.readouterr().out
    bad = run("r3", {"kl": [0.1, 0.1, 0.1]}, none=(9.0, 2.0, 1.0))
    assert cf.main([str(r1), str(bad), "--versus", "hybrid"]) == 2
    assert "differs from an earlier run" in capsys.readouterr().err
    assert cf.main([str(r1), "--versus", "nope"]) == 2
    (tmp_path / "junk.json").write_text("{}")
    assert cf.main([str(tmp_path / "junk.json")]) == 2
    assert "not the results.json of an eval.py --only lm run" in capsys.readouterr().err


def test_tune_compare_pairs_by_question_where_it_can(tmp_path):
    """bench/tune_compare.py: the difference against the first recipe with a paired interval where
    both logs hold per-question scores (checked by hand), the unpaired one where not, and a log
    that is not one refused in one line."""
    def row(replay, seed, scores):
        return {"seed": seed, "cfg": {"replay": replay, "replay_share": 0.0}, "recall": sum(scores) / len(scores),
                "n": len(scores), "by_window": {"0": 0.5}, "seconds": 10.0, "tokens": 1000, "scores": scores}
    log = tmp_path / "tune.jsonl"

    def compare(rows):
        log.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
        return subprocess.run([sys.executable, str(ROOT / "bench" / "tune_compare.py"), str(log)],
                              capture_output=True, text=True)
    rows = [row(8, s, [1, 0, 0, 1]) for s in (100, 101)] + [row(64, s, [1, 1, 0, 1]) for s in (100, 101)]
    out = compare(rows)
    # per document: differences (0, 1, 0, 0), mean 0.25, sample variance 0.25, / 4 questions; two documents
    half = 1.96 * math.sqrt(2 * 0.25 / 4 / 4)
    assert out.returncode == 0 and f"(paired by question): +0.250 [{0.25 - half:+.3f}, {0.25 + half:+.3f}]" in out.stdout
    for r in rows[2:]:
        del r["scores"]
    out = compare(rows)                                           # no scores: binomial variances, unpaired
    half = 1.96 * math.sqrt(2 * 0.25 / 4 / 4 + 2 * 0.1875 / 4 / 4)
    assert f"(unpaired): +0.250 [{0.25 - half:+.3f}, {0.25 + half:+.3f}]" in out.stdout
    out = compare(['{"seed": 1}\n'])
    assert out.returncode == 2 and "not a long_window_tune log" in out.stderr and "Traceback" not in out.stderr
