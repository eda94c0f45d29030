"""train.py end to end on a few KB of generated text with tiny models: training lowers the loss
below a unigram baseline, --resume is bit-exact, two gloo processes equal one, LoRA and full
continuation of a checkpoint, and errors: every bad flag value is one argparse line (exit 2)
before any work, bad data is one line that overwrites nothing. (nanoabsorber.data and
train_utils have their own tests: test_data.py, test_train_utils.py.)"""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from nanoabsorber import load
from nanoabsorber.errors import UserError
from nanoabsorber.data import train_sentencepiece
from tests.conftest import ROOT
from tests.conftest import make_text

TINY = ["--vocab-size", "300", "--dim", "32", "--n-layers", "2", "--n-heads", "4", "--seq-len", "32",
        "--batch-size", "4", "--warmup-steps", "2", "--log-every", "1", "--eval-batches", "2", "--val-frac", "0.1",
        "--threads", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    # on shared, busy cores one thread is much faster than two spinning OpenMP threads
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_text(tmp_path_factory.mktemp("corpus") / "data.txt")


def rows(out: Path, key: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if key in r and "event" not in r]


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


# ----------------------------------------------------------------------------- training end to end

def test_train_from_scratch_beats_unigram_and_loads(corpus, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--data", str(corpus), "--out", str(out), *TINY, "--max-steps", "120", "--lr", "1e-2",
                       "--eval-every", "60", "--log-every", "20", "--eval-batches", "4"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.model", "train_state.safetensors", "log.jsonl"} <= names
    val = rows(out, "val_loss")
    first, last, unigram = val[0]["val_loss"], val[-1]["val_loss"], val[-1]["unigram"]
    assert val[0]["step"] == 0 and abs(first - math.log(300)) < 0.2      # an untrained model is uniform
    assert last < unigram - 0.2 < first                                 # it learned more than word frequencies
    train_losses = [r["loss"] for r in rows(out, "loss")]
    assert train_losses[-1] < train_losses[0] - 1.0
    assert all(r["tokens_per_s"] > 0 for r in rows(out, "tokens_per_s"))

    # the folder loads as it is, with its tokenizer: BPE, byte fallback, identity normalization
    model, tok = load(out)
    assert model.cfg.vocab_size == tok.vocab_size == 300 and model.cfg.n_layers == 2
    for text in ["Zebra ünïcødé 😀 \x01 tab\there", "  two  spaces\n\nand newlines"]:
        assert tok.decode(tok.encode(text, allow_special=False)) == text
    # the token cache sits beside the data, as uint16
    bins = list((corpus.parent / ".nanoabsorber-cache").glob("tokens-*.uint16.bin"))
    assert bins and all(b.stat().st_size % 2 == 0 for b in bins)
    # sample.py reads the output folder without conversion
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(out), "--prompt", "The cat", "--temperature", "0",
                        "--max-new-tokens", "8"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The cat") and len(r.stdout.strip()) > len("The cat")


def test_resume_is_bit_exact(corpus, tmp_path):
    common = ["--data", str(corpus), *TINY, "--grad-accum", "2", "--decay-steps", "6", "--eval-every", "2"]
    train.main([*common, "--out", str(tmp_path / "straight"), "--max-steps", "6"])
    train.main([*common, "--out", str(tmp_path / "split"), "--max-steps", "3"])
    train.main([*common, "--out", str(tmp_path / "split"), "--max-steps", "6", "--resume"])
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = load_file(tmp_path / "straight" / "train_state.safetensors")
    sb = load_file(tmp_path / "split" / "train_state.safetensors")
    assert sa.keys() == sb.keys() and any(k.startswith("optim.") for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # the resumed log continues the first part's rows (val at 4 and 6 came from the second process)
    steps = [r["step"] for r in rows(tmp_path / "split", "loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows(tmp_path / "split", "loss")] == [r["loss"] for r in rows(tmp_path / "straight", "loss")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(corpus, tmp_path):
    args = ["--data", str(corpus), *TINY, "--grad-accum", "2", "--max-steps", "4", "--eval-every", "2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "train.py", *args, "--out", str(tmp_path / "ddp")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    train.main([*args, "--out", str(tmp_path / "single")])
    # both ranks end with bit-identical weights (each rank's own hash, gathered), equal to the saved ones
    done = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines() if '"done"' in x][0]
    h0, h1 = done["weights_sha256"]
    assert h0 == h1 and f"rank 1: weights sha256 {h1}" in r.stderr and f"rank 0: weights sha256 {h0}" in r.stderr
    # the same global batch gives the same loss as one process accumulating both halves
    d = [x["loss"] for x in rows(tmp_path / "ddp", "loss")]
    s = [x["loss"] for x in rows(tmp_path / "single", "loss")]
    assert len(d) == len(s) == 4
    np.testing.assert_allclose(d, s, rtol=1e-5)
    dv = [x["val_loss"] for x in rows(tmp_path / "ddp", "val_loss")]
    sv = [x["val_loss"] for x in rows(tmp_path / "single", "val_loss")]
    np.testing.assert_allclose(dv, sv, rtol=1e-5)
    a = load_file(tmp_path / "ddp" / "model.safetensors")
    b = load_file(tmp_path / "single" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_continue_a_checkpoint_with_lora_and_fully(corpus, tmp_path):
    base = tmp_path / "base"
    train.main(["--data", str(corpus), "--out", str(base), *TINY, "--max-steps", "3"])
    lora = tmp_path / "lora"
    lora_args = ["--data", str(corpus), "--init", str(base), "--lora", "--lora-rank", "4", "--lr", "1e-2",
                 "--seq-len", "32", "--batch-size", "4", "--warmup-steps", "1", "--log-every", "1", "--eval-every", "0",
                 "--eval-batches", "2", "--val-frac", "0.1", "--threads", "1", "--lora-dropout", "0.1"]
    train.main([*lora_args, "--out", str(lora), "--max-steps", "4"])
    # saving mid-run (LoRA merged for the checkpoint, then taken out) and resuming change nothing
    split = tmp_path / "lora-split"
    train.main([*lora_args, "--out", str(split), "--max-steps", "2", "--save-every", "1"])
    train.main([*lora_args, "--out", str(split), "--max-steps", "4", "--resume"])
    for name in ("model.safetensors", "adapter.safetensors", "train_state.safetensors"):
        a, b = load_file(lora / name), load_file(split / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (lora / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    b = load_file(base / "model.safetensors")
    m = load_file(lora / "model.safetensors")
    changed = {k for k in b if not torch.equal(b[k], m[k])}
    lin = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed and all(any(t in k for t in lin) for k in changed)   # embeddings and norms stay frozen
    assert len(changed) == 2 * 7                                         # every targeted matrix moved
    # merged output == base + adapter
    from nanoabsorber.lora import load_adapter

    base_model, _ = load(base, tokenizer=False)
    load_adapter(base_model, lora / "adapter.safetensors", merge=True)
    lora_model, _ = load(lora, tokenizer=False)
    merged, saved = base_model.state_dict(), lora_model.state_dict()
    assert {k for k in merged if "lora_" not in k} == set(saved)
    for k, v in saved.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)
    # full continuation: everything trains
    full = tmp_path / "full"
    train.main(["--data", str(corpus), "--out", str(full), "--init", str(base), "--seq-len", "32", "--batch-size", "4",
                "--max-steps", "2", "--warmup-steps", "1", "--eval-every", "0", "--eval-batches", "2",
                "--val-frac", "0.1", "--threads", "1", "--lr", "1e-2"])
    f = load_file(full / "model.safetensors")
    assert all(not torch.equal(b[k], f[k]) for k in b)


# ----------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def tokenizer_file(corpus, tmp_path_factory):
    return train_sentencepiece([corpus], 300, tmp_path_factory.mktemp("tok"), log=lambda *a: None)


@pytest.mark.parametrize("kind,pattern", [
    ("empty", "empty file"),
    ("binary", "binary file"),
    ("latin1", "not UTF-8"),
    ("small", "fewer than one batch"),
])
def test_bad_data_is_one_clear_error_and_writes_nothing(tmp_path, tokenizer_file, kind, pattern):
    data = tmp_path / "d.txt"
    data.write_bytes({"empty": b"", "binary": b"\x7fELF\x02\x01\x01\x00\x00" + bytes(range(256)),
                      "latin1": "caf\xe9 au lait\n".encode("latin-1"), "small": b"Just one short line.\n"}[kind])
    out = tmp_path / "out"
    with pytest.raises(UserError, match=pattern) as e:
        train.main(["--data", str(data), "--out", str(out), *TINY, "--tokenizer", str(tokenizer_file)])
    assert "\n" not in str(e.value)
    assert not out.exists()


def test_resume_with_another_configuration_is_refused(corpus, tmp_path):
    out = tmp_path / "run"
    common = ["--data", str(corpus), "--out", str(out), *TINY]
    train.main([*common, "--max-steps", "2"])
    before = snapshot(out)
    with pytest.raises(UserError, match=r"cannot resume.*model\.dim: saved 32, now 48"):
        train.main([*common[:-len(TINY)], *TINY, "--dim", "48", "--max-steps", "4", "--resume"])
    with pytest.raises(UserError, match="already holds a checkpoint"):
        train.main([*common, "--max-steps", "4"])                      # no --resume: refuse to overwrite
    with pytest.raises(UserError, match="nothing to resume"):
        train.main([*common[:3], str(tmp_path / "empty"), *TINY, "--resume"])
    assert snapshot(out) == before


def test_command_line_error_is_one_line_and_exit_2(tmp_path):
    data = tmp_path / "blob.bin"
    data.write_bytes(bytes(range(256)) * 4)
    r = subprocess.run([sys.executable, "train.py", "--data", str(data), "--out", str(tmp_path / "o")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "binary file" in last and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- bad flags

def bad_values(tmp_path: Path) -> dict:
    """flag -> invalid values; the test below checks that every flag of train.py has some."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    ints = lambda *v: [str(x) for x in v] + ["1.5"]        # noqa: E731
    floats = lambda *v: [str(x) for x in v] + ["abc"]      # noqa: E731
    return {
        "--data": [str(tmp_path / "missing")],
        "--out": [str(a_file), str(a_file / "sub"), str(tmp_path / "m.safetensors")],
        "--cache-dir": [str(a_file), str(a_file / "sub" / "sub")], "--val-frac": floats(-0.1, 1), "--tokenizer": [str(tmp_path / "missing")],
        "--vocab-size": ints(259, 0), "--init": [str(tmp_path / "missing")], "--preset": ["huge"],
        "--n-layers": ints(0), "--dim": ints(-8), "--n-heads": ints(0), "--n-kv-heads": ints(0),
        "--hidden-dim": ints(0), "--tie-embeddings": ["=x"], "--no-tie-embeddings": ["=x"], "--seq-len": ints(0),
        "--lora": ["=x", ""], "--no-lora": ["=x"], "--lora-rank": ints(0), "--lora-alpha": floats(0),
        "--lora-targets": ["qq", ","], "--lora-dropout": floats(1.0, -0.1),
        "--batch-size": ints(0, -1), "--grad-accum": ints(0), "--max-steps": ints(0, -3), "--lr": floats(0, -1e-3),
        "--min-lr": floats(-1), "--warmup-steps": ints(-1), "--decay-steps": ints(0), "--weight-decay": floats(-0.1),
        "--beta1": floats(1, -0.5), "--beta2": floats(1.5), "--grad-clip": floats(-1),
        "--eval-every": ints(-1), "--eval-batches": ints(0), "--log-every": ints(0), "--save-every": ints(-1),
        "--resume": ["=x"], "--no-resume": ["=x"], "--dtype": ["float16", "int8"], "--seed": ints(-1),
        "--device": ["tpu"], "--attn": ["flash"], "--threads": ints(0, -2),
    }


def test_every_bad_flag_value_is_one_argparse_line_and_exit_2(corpus, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("slow work started before the flags were checked")

    monkeypatch.setattr(train, "start_processes", boom)
    monkeypatch.setattr(train, "train", boom)
    bad = bad_values(tmp_path)
    flags = {s for a in train.build_parser()._actions for s in a.option_strings} - {"-h", "--help"}
    assert flags == set(bad)                                 # a new flag needs its bad values here
    out = tmp_path / "out"
    base = ["--data", str(corpus), "--out", str(out)]
    n = 0
    for flag, values in bad.items():
        for v in values:
            argv = base + ([flag + v] if v.startswith("=") or v == "" else [flag, v])
            with pytest.raises(SystemExit) as e:
                train.main(argv)
            err = capsys.readouterr().err
            assert e.value.code == 2, (argv, err)
            lines = err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("train.py: error: argument "), (argv, err)
            assert flag.replace("--no-", "--") in lines[0], (argv, err)
            n += 1
    assert n > 2 * len(bad) - 10 and not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--lora-rank", "4"], "argument --lora-rank: LoRA settings need --lora"),
    (["--lora-alpha=16", "--lr", "1e-3"], "argument --lora-alpha: LoRA settings need --lora"),
    (["--lora"], "argument --lora: needs --init"),
    (["--init", "default", "--preset", "small"], "argument --preset: cannot be combined with --init"),
    (["--init", "default", "--tokenizer", "."], "argument --tokenizer: cannot be combined with --init"),
    (["--dim", "64", "--n-heads", "5"], "argument --n-heads: dim 64 is not divisible by n_heads 5"),
    (["--n-heads", "4", "--n-kv-heads", "3"], "argument --n-kv-heads: n_heads 4 is not a multiple of n_kv_heads 3"),
    ([], "argument --data: is required"),
])
def test_bad_flag_combinations(corpus, tmp_path, capsys, argv, message):
    base = ["--data", str(corpus), "--out", str(tmp_path / "o")] if argv else ["--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        train.main(base + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and f"train.py: error: {message}" in err, err


def test_grad_accum_must_split_over_the_processes(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(corpus), "--out", str(tmp_path / "o"), "--grad-accum", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --grad-accum: 3 is not a multiple of the 2 processes" in err
