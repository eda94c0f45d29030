"""absorb.py: bad input gives one line and exit 2, before the model loads, and leaves no output."""
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


@pytest.mark.parametrize("content,match", [(b"", "is empty"), (b"   \n\n", "is empty"),
                                            (b"\x00\x01\x02binary", "binary"), (b"\xff\xfe\xfa", "not UTF-8")])
def test_absorb_cli_rejects_bad_context(tmp_path, content, match):
    f = tmp_path / "ctx.txt"
    f.write_bytes(content)
    out = tmp_path / "a.safetensors"
    r = subprocess.run([sys.executable, str(ROOT / "absorb.py"), "--context", str(f), "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and str(f) in err[0] and match in err[0] and "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_absorb_cli_rejects_unknown_probe_kind(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "absorb.py"), "--probes", "recite,summary"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "unknown probe kind" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--probes" in r.stderr


# ----------------------------------------------------------------------------- resume and incremental absorption

def _absorb(ckpt, text_file, out, *extra, wait=True):
    cmd = [sys.executable, str(ROOT / "absorb.py"), "--ckpt", str(ckpt), "--context", str(text_file), "--out",
           str(out), "--chunk", "96", "--sync-len", "48", "--steps", "6", "--gen-tokens", "16", "--threads", "1",
           *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    from nanoabsorber.benchdocs import make_story

    f = tmp_path_factory.mktemp("story") / "story.txt"
    f.write_text(make_story(3, 420))                          # about 4 windows of 96 tokens
    return f


def test_killed_mid_window_then_resumed_gives_the_same_adapter(tiny_ckpt, story, tmp_path):
    import signal
    import time

    from nanoabsorber.absorb_state import partial_path, read_state

    r = _absorb(tiny_ckpt, story, tmp_path / "whole.safetensors")
    assert r.returncode == 0, r.stderr
    whole = read_state(tmp_path / "whole.safetensors")
    assert whole["windows"] >= 3 and whole["windows_done"] == whole["windows"]

    out = tmp_path / "cut.safetensors"
    p = _absorb(tiny_ckpt, story, out, wait=False)
    deadline = time.time() + 240
    while not partial_path(out).exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)                                # during window 2: the state after window 1 exists
    p.wait()
    assert not out.exists() and read_state(partial_path(out))["windows_done"] < whole["windows"]

    r = _absorb(tiny_ckpt, story, out, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr and not partial_path(out).exists()
    a, b = _tensors(tmp_path / "whole.safetensors"), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_text_or_recipe_and_a_missing_state(tiny_ckpt, story, tmp_path):
    from nanoabsorber.absorb_state import partial_path, signature, state_meta
    from nanoabsorber.absorber import AbsorbConfig
    from nanoabsorber.lora import apply_lora, save_adapter
    from tests.conftest import tiny

    out = tmp_path / "a.safetensors"
    r = _absorb(tiny_ckpt, story, out, "--resume")
    assert r.returncode == 2 and "nothing to resume" in r.stderr and "Traceback" not in r.stderr
    # a state made with another text: the signature check refuses it, naming what differs
    m = tiny(vocab=512, dim=32, layers=2)
    apply_lora(m, "all", 16, 32)
    save_adapter(m, partial_path(out), **state_meta(signature("another text", AbsorbConfig()), 1, 4))
    r = _absorb(tiny_ckpt, story, out, "--resume")
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(err) == 1 and "cannot resume" in err[0] and "the text to absorb" in err[0]


def test_going_on_from_an_adapter(tiny_ckpt, story, tmp_path):
    from nanoabsorber.absorb_state import file_sha256, read_state

    first = tmp_path / "first.safetensors"
    assert _absorb(tiny_ckpt, story, first).returncode == 0
    more = tmp_path / "more.txt"
    more.write_text("The lighthouse keeper of Vell is called Anna Brill. She has a grey cat named Pepper.\n" * 4)
    same = tmp_path / "same.safetensors"
    r = _absorb(tiny_ckpt, more, same, "--adapter", str(first), "--steps", "0")
    assert r.returncode == 0, r.stderr
    a, b = _tensors(first), _tensors(same)                   # no steps: the adapter it started from
    assert all(torch.equal(a[k], b[k]) for k in a)
    grown = tmp_path / "grown.safetensors"
    assert _absorb(tiny_ckpt, more, grown, "--adapter", str(first)).returncode == 0
    c = _tensors(grown)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert read_state(grown)["signature"]["start_adapter"] == file_sha256(first)


def test_a_corpus_in_one_command_skips_finished_and_failed_files(tiny_ckpt, story, tmp_path):
    from nanoabsorber.absorb_state import read_state

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(story.read_text()[:600])
    (docs / "b.md").write_text("Anna Brill keeps the lighthouse of Vell. Her cat is called Pepper.\n" * 3)
    (docs / "bad.txt").write_bytes(b"\xff\xfe not text")
    (docs / "notes.pdf").write_bytes(b"%PDF")                            # not a text file: not a document
    out = tmp_path / "adapters"
    cmd = ["--context-dir", str(docs), "--out-dir", str(out), "--steps", "2"]
    r = _absorb_cmd(tiny_ckpt, *cmd)
    assert r.returncode == 1, r.stderr                                   # one document failed
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors", "b.safetensors"]
    assert _table(r) == {"a.txt": "absorbed", "b.md": "absorbed", "bad.txt": "failed: not UTF-8 text"}
    # the same adapter as a one-document run
    one = tmp_path / "one.safetensors"
    r1 = _absorb(tiny_ckpt, docs / "b.md", one, "--steps", "2")
    assert r1.returncode == 0, r1.stderr
    a, b = _tensors(one), _tensors(out / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a rerun skips what is finished; a changed file is absorbed again
    (docs / "bad.txt").unlink()
    (docs / "b.md").write_text("Anna Brill keeps the lighthouse of Vell. Her dog is called Salt.\n" * 3)
    r = _absorb_cmd(tiny_ckpt, *cmd)
    assert r.returncode == 0, r.stderr
    assert _table(r) == {"a.txt": "skipped (finished)", "b.md": "absorbed"}
    assert read_state(out / "b.safetensors")["windows_done"] >= 1


def _table(r) -> dict:
    """The summary table of a corpus run: {file: status (first words)}."""
    rows = [ln.split(None, 1) for ln in r.stdout.splitlines() if ln.startswith(("a.txt", "b.md", "bad.txt"))]
    return {name: " ".join(rest.split()[:2]) if rest.startswith("skipped") else
            (" ".join(rest.split()[:4]) if rest.startswith("failed") else rest.split()[0]) for name, rest in rows}


def _absorb_cmd(ckpt, *args):
    cmd = [sys.executable, str(ROOT / "absorb.py"), "--ckpt", str(ckpt), "--chunk", "96", "--sync-len", "48",
           "--gen-tokens", "16", "--threads", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_under_torchrun_the_corpus_is_shared_out(tmp_path, monkeypatch):
    """Each process takes every WORLD_SIZE-th file from its RANK: together all, none twice."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_absorb_script", ROOT / "absorb.py")
    absorb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(absorb)
    for i in range(5):
        (tmp_path / f"d{i}.txt").write_text("x")
    opts = absorb.AbsorbScript(context_dir=str(tmp_path), out_dir=str(tmp_path / "out"))
    shares = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        shares.append([f.name for f in absorb.corpus_files(opts)])
    assert sorted(shares[0] + shares[1]) == [f"d{i}.txt" for i in range(5)] and not set(shares[0]) & set(shares[1])


def test_progress_eta_counts_the_planned_steps_not_the_cap(capsys):
    # with --epochs a window's steps are known only once its Y is: the ETA must use them, not --steps
    sys.path.insert(0, str(ROOT))
    import absorb

    p = absorb.Progress(total_tokens=3000, steps=150, windows=3)
    assert p.todo == 450                                      # before any window: the cap
    p({"chunk": 1, "chunks": 3, "step": 1, "of": 20, "loss": 1.0, "absorbed": 0})
    assert p.todo == 60                                       # 20 planned, 2 more windows estimated alike
    for s in range(2, 21):
        p({"chunk": 1, "chunks": 3, "step": s, "of": 20, "loss": 1.0, "absorbed": 0})
    p({"chunk": 2, "chunks": 3, "step": 1, "of": 30, "loss": 1.0, "absorbed": 1000})
    assert p.todo == 20 + 30 + 25
    err = capsys.readouterr().err
    assert "for 60 steps" in err and "step   1/30" in err
