"""nanoabsorber.data on a few KB of generated text: chunked reading, the SentencePiece tokenizer,
the token cache (streaming, reuse, read-only fallback), atomic writes, windows and the loader."""
import math
import os

import numpy as np
import pytest
import torch

from nanoabsorber.data import (MIN_VOCAB, DataError, TokenData, WindowLoader, cache_dir_for, check_data_files,
                               list_data_files, prepare_tokens, read_text_chunks, token_dtype, tokenize_to_file,
                               tokenizer_hash, train_sentencepiece, unigram_entropy)
from nanoabsorber.tokenizer import load_tokenizer
from tests.conftest import make_text

@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    corpus = make_text(tmp_path_factory.mktemp("corpus") / "data.txt")
    return train_sentencepiece([corpus], 300, tmp_path_factory.mktemp("tok"), log=lambda *a: None)


def test_token_cache_streaming_and_readonly_fallback(spm, tmp_path, monkeypatch):
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


def test_cache_files_are_written_atomically_and_readable_by_all(spm, tmp_path):
    """The token file, its metadata and the tokenizer go through nanoabsorber.io: plain-file
    permissions (not mkstemp's 0600) and no partial file or temp file left when encoding fails."""
    tok = load_tokenizer(spm)
    files = [make_text(tmp_path / "d" / "a.txt", n_lines=20)]
    cache = tmp_path / "cache"
    cache.mkdir()
    old = os.umask(0o022)
    try:
        tf = prepare_tokens(files, tok, tokenizer_hash(spm), cache, log=lambda *a: None)
    finally:
        os.umask(old)
    for p in (tf.path, tf.path.with_suffix(".json")):
        assert p.stat().st_mode & 0o777 == 0o644, p
    assert (spm.stat().st_mode & 0o444) == 0o444

    class Boom:
        vocab_size, bos_id, eos_id, add_bos = 300, 1, 2, True

        def __init__(self):
            self.calls = 0

        def encode(self, text, allow_special=False):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("encoder crashed")
            return [5] * 10

    out = tmp_path / "failed" / "tokens.bin"
    with pytest.raises(RuntimeError, match="encoder crashed"):
        tokenize_to_file(files, Boom(), out, chunk_bytes=64, log=lambda *a: None)
    assert list(out.parent.iterdir()) == []                    # neither the file nor a temp file


def test_bad_data_files_and_small_vocabulary(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        check_data_files([tmp_path / "empty.txt"])
    (tmp_path / "bin.txt").write_bytes(b"abc\x00def")
    with pytest.raises(DataError, match=r"binary file \(NUL byte at offset 3\)"):
        check_data_files([tmp_path / "bin.txt"])
    (tmp_path / "space.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="no text"):
        check_data_files([tmp_path / "space.txt"])
    with pytest.raises(DataError, match="no such file"):
        list_data_files(tmp_path / "missing")
    good = make_text(tmp_path / "g.txt", n_lines=5)
    with pytest.raises(DataError, match=f"use at least {MIN_VOCAB}"):
        train_sentencepiece([good], MIN_VOCAB - 1, tmp_path, log=lambda *a: None)


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
