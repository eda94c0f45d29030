# TRITON_INTERPRET must be set before any @triton.jit function is defined, so it goes first.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NANOABSORBER_QUIET", "1")

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from nanoabsorber.lora import apply_lora  # noqa: E402
from nanoabsorber.model import Llama, LlamaConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model tests (a few, still run in CI)")


@pytest.fixture(autouse=True)
def _restore_global_settings():
    """A test that runs a script's main() in-process (eval.py sets the torch threads and the
    attention path) must not change how the tests after it compute."""
    import nanoabsorber.attention as attention
    import nanoabsorber.losses as losses

    saved = torch.get_num_threads(), attention._IMPL, losses._IMPL
    yield
    torch.set_num_threads(saved[0])
    attention._IMPL, losses._IMPL = saved[1], saved[2]


# ----------------------------------------------------------------------------- shared helpers

def tiny(n_heads=4, n_kv_heads=2, dim=32, layers=2, vocab=97, tie=False, rope_scaling=None, head_dim=None,
         seed=0, **kw):
    cfg = LlamaConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      hidden_dim=3 * dim, max_seq_len=128, tie_embeddings=tie, rope_scaling=rope_scaling,
                      head_dim=head_dim, rope_theta=500.0, **kw)
    torch.manual_seed(seed)
    m = Llama(cfg)
    m.init_weights(std=0.2)
    for n, p in m.named_parameters():  # non-trivial norm weights
        if n.endswith("norm.weight"):
            p.data.uniform_(0.5, 1.5)
    return m.eval()


def lora_model(seed=0, layers=2):
    m = tiny(seed=seed, layers=layers)
    apply_lora(m, "all", 4, 8)
    return m


def ids(n, seed=0, vocab=97):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def same_logits(a, b, atol=0.0):
    idx = torch.randint(0, a.cfg.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(a(idx), b(idx), atol=atol, rtol=atol)


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


def write_tiny_checkpoint(folder: Path, vocab: int = 512, seed: int = 0, max_seq_len: int = 2048) -> Path:
    """A tiny random Llama + a SentencePiece tokenizer trained on generated text, saved as a
    checkpoint folder: what the scripts can load in seconds."""
    import sentencepiece as spm

    from nanoabsorber import save_checkpoint
    from nanoabsorber.benchdocs import make_fact_doc, make_story

    folder.mkdir(parents=True, exist_ok=True)
    lines = [p for k in range(30) for p in make_fact_doc(k, 80, 4).text.split("\n\n")]
    lines += make_story(0, 2000).split("\n\n")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), vocab_size=vocab, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    m = tiny(vocab=vocab, dim=32, layers=2, seed=seed)
    m.cfg.max_seq_len = max_seq_len
    save_checkpoint(m, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tinyckpt"))
