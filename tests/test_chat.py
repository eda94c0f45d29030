"""chat.py and nanoabsorber/memory.py: scripted mode end to end, the memory folder's lock, a kill
during an absorption, restoring a session, and the absorption layout (X = old turns, Y = the
turns after them + probes). A tiny random Llama with a byte-level ChatML tokenizer stands in for
the real model; one slow test uses the real one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoabsorber import load, save_checkpoint
from nanoabsorber.memory import ChatConfig, ChatSession, MemoryDir, absorb_groups, chat_recipe, segment
from nanoabsorber.tokenizer import BYTE_TO_CHAR
from tests.conftest import ROOT, tiny

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are tiny<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + "
          "'\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_chat_ckpt(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama with a byte-level BPE tokenizer (256 bytes, no merges) + ChatML special tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: b for b, c in BYTE_TO_CHAR.items()}
    added = [{"id": 256 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(("<|endoftext|>", "<|im_start|>", "<|im_end|>"))]
    tj = {"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": added, "normalizer": None,
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
          "post_processor": None, "decoder": {"type": "ByteLevel"}}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": CHATML}))
    m = tiny(vocab=259, dim=32, layers=2, seed=seed)
    m.cfg.max_seq_len = 2048
    save_checkpoint(m, folder)
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_chat_ckpt(tmp_path_factory.mktemp("tinychat"))


FAST = ["--device", "cpu", "--threads", "1", "--max-tokens", "8", "--window", "120", "--steps", "2"]


def chat(ckpt, *args, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "chat.py"), "--ckpt", str(ckpt), *FAST, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "NANOABSORBER_QUIET": "1"}, **kw)


def script(path: Path, turns: list) -> Path:
    path.write_text("".join(json.dumps(t) + "\n" for t in turns))
    return path


TURNS = [{"user": f"Fact {i}: the code word number {i} is {'abcdefgh'[i]}{i}{i}."} for i in range(6)]


def test_scripted_mode_end_to_end_absorbs_what_scrolls_out(ckpt, tmp_path):
    s = script(tmp_path / "turns.jsonl", TURNS + [{"command": "/remember"}, {"command": "/stats"}])
    out = tmp_path / "answers.jsonl"
    r = chat(ckpt, "--script", str(s), "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row.get("user") for row in rows[:6]] == [t["user"] for t in TURNS]
    assert all(isinstance(row["answer"], str) and row["kv_tokens"] > 0 for row in rows[:6])
    assert any(row["absorbed_turns"] > 0 for row in rows[:6])                # the window overflowed
    assert all(row["window_tokens"] <= 120 for row in rows[:6])              # ... and stayed bounded
    stats = rows[-1]
    assert stats["command"] == "/stats" and stats["window_tokens"] == 0       # /remember emptied it
    assert stats["tokens_absorbed"] == stats["tokens_seen"] > 0 and stats["absorptions"] >= 2
    assert "absorbing: step" in r.stderr and "ETA" in r.stderr                # never silent


def test_bad_script_and_out_without_script_are_one_line(ckpt, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "hi"}\n{"command": "/dance"}\n')
    r = chat(ckpt, "--script", str(bad))
    assert r.returncode == 2 and f"{bad}:2:" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = chat(ckpt, "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and "--out" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_second_instance_on_the_same_memory_is_refused(ckpt, tmp_path):
    mem = MemoryDir(tmp_path / "mem").lock()
    try:
        s = script(tmp_path / "t.jsonl", TURNS[:1])
        r = chat(ckpt, "--memory", str(tmp_path / "mem"), "--script", str(s))
        assert r.returncode == 2, r.stderr
        assert "in use by another chat.py" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        mem.close()
    r = chat(ckpt, "--memory", str(tmp_path / "mem"), "--script", str(s))   # released: now it runs
    assert r.returncode == 0, r.stderr


def _state(folder: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(folder / "state.safetensors"), framework="pt") as f:
        return {"md": f.metadata(), "t": {k: f.get_tensor(k) for k in f.keys()}}


def test_restart_restores_the_memory_and_refuses_other_settings(ckpt, tmp_path):
    mem = tmp_path / "mem"
    r = chat(ckpt, "--memory", str(mem), "--script", str(script(tmp_path / "a.jsonl", TURNS)))
    assert r.returncode == 0, r.stderr
    before = _state(mem)
    turns = json.loads(before["md"]["turns"])
    assert turns and json.loads(before["md"]["stats"])["tokens_absorbed"] > 0
    assert any(float(t.abs().sum()) > 0 for k, t in before["t"].items() if "lora_B" in k)   # memory was learned

    # in-process: the restored session has the same LoRA, window and counters
    model, tok = load(ckpt)
    cfg = ChatConfig(window=120, max_tokens=8)
    sess = ChatSession(model, tok, cfg, chat_recipe(steps=2))
    md = MemoryDir(mem).lock()
    md.check(sess)
    md.load(sess)
    md.close()
    assert sess.turns == turns and sess.stats.tokens_absorbed == json.loads(before["md"]["stats"])["tokens_absorbed"]
    from nanoabsorber.lora import lora_state_dict

    for k, v in lora_state_dict(model).items():
        torch.testing.assert_close(v, before["t"][k], rtol=0, atol=0)
    assert len(sess.transcript) == int(before["md"]["transcript_len"])

    # a second session answers from that state (its prompt holds the restored window)
    s2 = script(tmp_path / "b.jsonl", [{"command": "/stats"}, {"user": "What was fact 5?"}])
    r = chat(ckpt, "--memory", str(mem), "--script", str(s2))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows[0]["tokens_absorbed"] == json.loads(before["md"]["stats"])["tokens_absorbed"]
    assert rows[1]["kv_tokens"] > sess.n_tokens(turns)                         # window restored into the prompt

    # other settings or another base model: one line, exit 2
    r = chat(ckpt, "--memory", str(mem), "--script", str(s2), "--rank", "8")
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(err) == 1 and "another --memory folder" in err[0] and "Traceback" not in r.stderr
    other = write_chat_ckpt(tmp_path / "other", seed=1)
    r = chat(other, "--memory", str(mem), "--script", str(s2))
    assert r.returncode == 2 and "another base model" in r.stderr, r.stderr


def test_kill_during_absorption_leaves_the_last_good_state(ckpt, tmp_path):
    mem = tmp_path / "mem"
    s = script(tmp_path / "t.jsonl", TURNS)
    p = subprocess.Popen([sys.executable, str(ROOT / "chat.py"), "--ckpt", str(ckpt), *FAST, "--steps", "100000",
                          "--memory", str(mem), "--script", str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT, env={**os.environ, "NANOABSORBER_QUIET": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline:                     # wait until an absorption is under way
            line = p.stderr.readline()
            if "absorbing: step" in line:
                break
        else:
            pytest.fail("no absorption started")
        good = (mem / "state.safetensors").read_bytes()   # saved before the absorption started
        time.sleep(0.3)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    assert (mem / "state.safetensors").read_bytes() == good
    before = json.loads(_state(mem)["md"]["turns"])
    r = chat(ckpt, "--memory", str(mem), "--steps", "2", "--script",
             str(script(tmp_path / "u.jsonl", [{"command": "/stats"}])))
    assert r.returncode == 0, r.stderr                    # the lock died with the process; the state loads
    row = json.loads(r.stdout.splitlines()[0])
    assert row["window_tokens"] > 120 and json.loads(_state(mem)["md"]["turns"]) == before
    assert not list(mem.glob(".*.tmp"))


def test_absorb_groups_layout():
    """X = the old turns as the template renders them after the header; Y_1 = the following turns
    then the recite probe, laid out as a later question would be."""
    model, tok = load(write_chat_ckpt(Path(os.environ.get("TMPDIR", "/tmp")) / f"tinychat-{os.getpid()}"))
    old = [{"role": "user", "content": "My dog is Biscuit."}, {"role": "assistant", "content": "Nice."}]
    fol = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    (p, x, ys), = absorb_groups(tok, None, old, fol, chat_recipe())
    full = tok.encode(tok.apply_chat_template(old + fol, add_generation_prompt=False))
    assert p + x + ys[0][:len(full) - len(p) - len(x)] == full
    assert tok.decode(p) == "<|im_start|>system\nYou are tiny<|im_end|>\n"
    tail = tok.decode(ys[0][len(full) - len(p) - len(x):])
    assert tail == ("<|im_start|>user\nRepeat the text above word for word.<|im_end|>\n<|im_start|>assistant\n"
                    "User: My dog is Biscuit.\nAssistant: Nice.<|im_end|>\n")
    assert segment(tok, None, [], old) == tok.decode(x)
    (_, _, ys), = absorb_groups(tok, None, old, fol, chat_recipe(sync_len=5))   # following turns cut at 5
    assert len(ys) == 2 and len(ys[0]) == 5


@pytest.mark.slow
def test_real_model_recalls_a_fact_that_scrolled_out(tmp_path):
    """SmolLM2-135M-Instruct: a name stated in the first turn, absorbed, asked about afterwards.
    One torch thread: on a shared 2-core machine two threads were 20x slower (oversubscription)."""
    torch.set_num_threads(1)                               # conftest restores it after the test
    model, tok = load()
    sess = ChatSession(model, tok, ChatConfig(window=64, max_tokens=24), chat_recipe(steps=24))
    sess.answer("Remember this: my cat is called Pumpernickel.")
    sess.absorb()                                          # the fact leaves the window
    assert not sess.turns and sess.stats.tokens_absorbed > 0
    assert "Pumpernickel" in sess.answer("What is my cat called?")


def test_interactive_commands_over_a_pipe(ckpt, tmp_path):
    """The terminal loop reads stdin: answers stream to stdout, /stats, /forget (asks y/N), /save,
    /quit; the memory folder is written and unlocked at the end."""
    mem = tmp_path / "mem"
    stdin = "\n".join(["hello there", "/stats", "/remember", "/forget", "n", "/forget", "y",
                       f"/save {tmp_path / 'a.safetensors'}", "/quit"]) + "\n"
    r = chat(ckpt, "--memory", str(mem), input=stdin)
    assert r.returncode == 0, r.stderr
    assert "bot> " in r.stdout and "tokens_seen:" in r.stderr and "memory reset" in r.stderr
    assert r.stderr.count("memory reset") == 1                                # "n" kept it
    assert (tmp_path / "a.safetensors").exists() and (mem / "state.safetensors").exists()
    assert json.loads(_state(mem)["md"]["stats"])["tokens_seen"] == 0          # forgotten, then saved
    MemoryDir(mem).lock().close()                                              # the lock was released
