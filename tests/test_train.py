"""train.py and nanoabsorber.data on a few KB of generated text with tiny models: training lowers
the loss below a unigram baseline, --resume is bit-exact, two gloo processes equal one, LoRA and
full continuation of a checkpoint, the token cache, and one-line errors that overwrite nothing."""
import json
import math
import os
import random
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
from nanoabsorber.cli import UserError
from nanoabsorber.data import (TokenData, WindowLoader, cache_dir_for, list_data_files, prepare_tokens, read_text_chunks,
                               token_dtype, tokenizer_hash, train_sentencepiece, unigram_entropy)
from nanoabsorber.tokenizer import load_tokenizer
from nanoabsorber.train_utils import get_lr

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the cat sat on a mat and dog ran to big red house over hill with small green tree under blue sky "
         "Émile café naïve").split()


def make_text(path: Path, n_lines=300, seed=0) -> Path:
    """Sentences from a small vocabulary with some structure (a word often repeats its successor)."""
    r = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [r.choice(WORDS)]
        for _ in range(r.randint(3, 11)):
            words.append(WORDS[(WORDS.index(words[-1]) + 1) % len(WORDS)] if r.random() < 0.6 else r.choice(WORDS))
        lines.append(" ".join(words).capitalize() + ".")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


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
    train.main(["--data", str(corpus), "--out", str(lora), "--init", str(base), "--lora-rank", "4", "--lr", "1e-2",
                "--seq-len", "32", "--batch-size", "4", "--max-steps", "4", "--warmup-steps", "1", "--log-every", "1",
                "--eval-every", "0", "--eval-batches", "2", "--val-frac", "0.1", "--threads", "1"])
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


# ----------------------------------------------------------------------------- data and cache

def test_token_cache_streaming_and_readonly_fallback(corpus, tmp_path, monkeypatch):
    spm = train_sentencepiece([corpus], 300, tmp_path, log=lambda *a: None)
    tok = load_tokenizer(spm)
    data_dir = tmp_path / "ro"
    f = make_text(data_dir / "a.txt", n_lines=80, seed=1)
    make_text(data_dir / "sub" / "b.txt", n_lines=40, seed=2)
    (data_dir / ".hidden").write_text("ignored")
    files = list_data_files(data_dir)
    assert [p.name for p in files] == ["a.txt", "b.txt"]
    # chunked (64-byte chunks) tokenization equals whole-file encoding, documents framed by BOS/EOS
    whole = []
    for p in files:
        whole += [tok.bos_id] + tok.encode(p.read_text(), allow_special=False) + [tok.eos_id]
    cache = tmp_path / "cache1"
    cache.mkdir()
    tf = prepare_tokens(files, tok, tokenizer_hash(spm), cache, log=lambda *a: None, chunk_bytes=64)
    assert tf.dtype == np.uint16 and tf.n_tokens == len(whole)
    assert np.fromfile(tf.path, dtype=np.uint16).tolist() == whole
    # windows of seq_len + 1 from the memmap: targets are inputs shifted by one; validation is the tail
    data = TokenData(tf.path, tf.dtype, tf.n_tokens, seq_len=8, val_frac=0.1)
    x, y = data.batch([0, 2])
    assert x.dtype == torch.int64 and x.shape == y.shape == (2, 8)
    assert x[1].tolist() == whole[16:24] and y[1].tolist() == whole[17:25]
    vx, _ = data.val_batch([0])
    assert data.n_train_tokens + data.n_val_tokens == len(whole) and data.n_val_tokens == round(0.1 * len(whole))
    assert vx[0].tolist() == whole[data.n_train_tokens:data.n_train_tokens + 8]
    # reused, not rewritten; a changed file changes the key
    mtime = tf.path.stat().st_mtime_ns
    again = prepare_tokens(files, tok, tokenizer_hash(spm), cache, log=lambda *a: None)
    assert again.path == tf.path and tf.path.stat().st_mtime_ns == mtime
    f.write_text(f.read_text() + "More text.\n")
    assert prepare_tokens(files, tok, tokenizer_hash(spm), cache, log=lambda *a: None).path != tf.path
    # a read-only data folder (no write bits: honoured even as root) -> the user cache
    monkeypatch.setenv("NANOABSORBER_CACHE", str(tmp_path / "usercache"))
    assert cache_dir_for(data_dir) == data_dir / ".nanoabsorber-cache"
    writable = tmp_path / "ro2"
    make_text(writable / "c.txt", n_lines=5)
    os.chmod(writable, 0o555)
    try:
        assert cache_dir_for(writable) == tmp_path / "usercache" / "data"
        assert cache_dir_for(writable / "c.txt") == tmp_path / "usercache" / "data"
        assert not (writable / ".nanoabsorber-cache").exists()
    finally:
        os.chmod(writable, 0o755)
    assert cache_dir_for(writable, tmp_path / "explicit") == tmp_path / "explicit"
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_read_text_chunks_cuts_at_lines_and_keeps_multibyte_characters(tmp_path):
    text = "".join(f"ligne {i} — café ☕ {'é' * (i % 7)}\n" for i in range(200)) + "no newline at the end 😀"
    p = tmp_path / "t.txt"
    p.write_text(text, encoding="utf-8")
    chunks = list(read_text_chunks(p, chunk_bytes=37))
    assert "".join(chunks) == text and len(chunks) > 50
    assert all(c.endswith("\n") for c in chunks[:-1])


def test_window_loader_epochs_and_split():
    loader = WindowLoader(10, 4, seed=3)
    seen = [loader.next() for _ in range(4)]
    assert sorted(np.concatenate(seen[:2]).tolist()) == sorted(set(np.concatenate(seen[:2]).tolist()))
    assert loader.state()["epoch"] == 1 and loader.state()["pos"] == 8
    resumed = WindowLoader(10, 4, seed=3, epoch=0, pos=8)   # continues where seen[1] stopped: next epoch
    assert resumed.next().tolist() == seen[2].tolist()
    assert abs(unigram_entropy(np.array([0, 1, 0, 1]), 5) - math.log(2)) < 1e-12


def test_lr_schedule():
    lrs = [get_lr(s, 1.0, 0.1, 10, 100) for s in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.55)
    assert lrs[100] == lrs[119] == 0.1 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


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
