"""Issue 10 on a lent GPU: the long-document benchmark at 4k tokens (3 report seeds) and the replay
lever on tuning documents, run side by side as separate processes under one deadline.

    python bench/gpu_long.py --deadline 480 --work /tmp/gpu_runs [--device cuda]

Wave 1 (all at once):
  report  eval.py --only long --long-lengths 4096 --methods hybrid,ntp --seed S, S = 0, 1, 2: the
          default recipe (absorb.py's) on fresh 4k catalogues, never used for tuning
  tune    bench/long_window_tune.py --tokens 4096 --chunk 1024 --doc-seed D --replay R, D = 100, 101 (tuning
          documents), R = 8 (the default) and 64 (more than the earlier passages of any window of a
          4k document: every earlier passage is replayed)
  demo    absorb.py --device cuda (the README's demo: 8 questions)
Wave 2, only if the rule below picks replay 64 and the time left is at least 1.3x what wave 1 took:
  report  the same 4k report seeds and the 2k report seeds (0, 1, 2) with --replay 64.
The rule, fixed before the run: replay 64 replaces the default iff its recall, averaged over the two
tuning documents, beats replay 8's by at least 0.03. Report seeds never enter the choice.

`--micro-tokens 1024` everywhere (one forward/backward per step of 512 Y tokens; the default 256
is a CPU memory setting and gives the same gradient up to float summation order). Every process
writes its log and results under --work; on the deadline the rest are killed (their logs kept).
At the end --work is packed into $OUT/gpu_runs.tar.gz and a summary is printed.

Seen on 2026-11-30 (one H200, docs/results/gpu_2026-11-30.md): with these 8 processes sharing the GPU
a step of 512 Y tokens took 2.1-2.8 s, so a 560 s deadline ended wave 1 in the second of five windows
of the 4k documents (the demo finished). That run's tuning jobs lacked --chunk 1024 (one 4k window,
so replay had nothing to act on); fixed here. Next time: time one process alone for a minute first.
"""
import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--deadline", type=float, default=480, help="seconds from start until every process is stopped")
p.add_argument("--work", default="/tmp/gpu_runs")
p.add_argument("--device", default="cuda")
p.add_argument("--waves", type=int, default=2, help="1: wave 1 only")
args = p.parse_args()
t_start = time.time()
work = Path(args.work)
work.mkdir(parents=True, exist_ok=True)
py = sys.executable
common = ["--device", args.device, "--micro-tokens", "1024"]


def report(seed, length, extra=()):
    name = f"report_{length}_s{seed}" + ("_" + "_".join(x.strip("-") for x in extra) if extra else "")
    return name, [py, "eval.py", "--only", "long", "--long-lengths", str(length), "--long-styles", "catalogue",
                  "--long-questions", "12", "--methods", "hybrid,ntp", "--seed", str(seed), "--threads", "1",
                  "--out", str(work / name), *common, *extra]


def tune(doc_seed, replay):
    name = f"tune_4096_d{doc_seed}_r{replay}"
    return name, [py, "bench/long_window_tune.py", "--tokens", "4096", "--chunk", "1024", "--doc-seed", str(doc_seed),
                  "--replay", str(replay), "--threads", "1", "--log", str(work / f"{name}.jsonl"), *common]


def launch(jobs):
    procs = {}
    for name, cmd in jobs:
        fh = open(work / f"{name}.log", "w")
        fh.write(" ".join(cmd[1:]) + "\n")
        fh.flush()
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"}), time.time())
        print(f"[{time.time() - t_start:5.0f}s] started {name}", flush=True)
    return procs


def wait(procs, names=None):
    """Wait for `names` (default all) or the deadline; kill the rest at the deadline."""
    names = set(procs) if names is None else set(names)
    while True:
        live = [n for n in names if procs[n][0].poll() is None]
        if not live:
            return True
        if time.time() - t_start > args.deadline:
            for n, (pr, _) in procs.items():
                if pr.poll() is None:
                    pr.kill()
                    pr.wait(timeout=30)
                    print(f"[{time.time() - t_start:5.0f}s] killed {n} at the deadline", flush=True)
            return False
        time.sleep(2)


def done_msg(procs):
    for n, (pr, t0) in procs.items():
        if pr.poll() is not None and not getattr(pr, "_said", False):
            pr._said = True
            print(f"[{time.time() - t_start:5.0f}s] {n} exited {pr.returncode} after {time.time() - t0:.0f}s", flush=True)


def tune_recall(name):
    f = work / f"{name}.jsonl"
    return json.loads(f.read_text().splitlines()[-1])["recall"] if f.exists() and f.read_text().strip() else None


wave1 = [report(s, 4096) for s in (0, 1, 2)] + [tune(d, r) for d in (100, 101) for r in (8, 64)]
wave1 += [("demo", [py, "absorb.py", "--device", args.device, "--out", str(work / "demo.safetensors")])]
procs = launch(wave1)
tunes = [n for n, _ in wave1 if n.startswith("tune")]
ok = wait(procs, tunes)
done_msg(procs)
r = {n: tune_recall(n) for n in tunes}
print("tuning recall:", json.dumps(r), flush=True)
pick64 = None
if all(v is not None for v in r.values()):
    m8 = (r["tune_4096_d100_r8"] + r["tune_4096_d101_r8"]) / 2
    m64 = (r["tune_4096_d100_r64"] + r["tune_4096_d101_r64"]) / 2
    pick64 = m64 >= m8 + 0.03
    print(f"rule: replay 64 mean {m64:.3f} vs replay 8 mean {m8:.3f} -> {'replay 64' if pick64 else 'keep replay 8'}",
          flush=True)
ok = wait(procs) and ok
done_msg(procs)
t1 = time.time() - t_start
print(f"[{t1:5.0f}s] wave 1 finished: {'all done' if ok else 'deadline hit'}", flush=True)
if ok and pick64 and args.waves > 1 and args.deadline - t1 >= 1.3 * t1:
    procs2 = launch([report(s, n, ("--replay", "64")) for n in (4096, 2048) for s in (0, 1, 2)])
    wait(procs2)
    done_msg(procs2)
    procs.update(procs2)
elif pick64:
    print(f"wave 2 not started: {args.deadline - t1:.0f}s left, wave 1 took {t1:.0f}s", flush=True)

# summary: every finished report and tuning run
for n in sorted(procs):
    res = work / n / "results.json"
    if res.exists():
        s = json.loads(res.read_text())["long"]["summary"]
        print(n, "  ".join(f"{k} {v['lenient']:.2f}" + (f" ({v['absorb_seconds_per_1k_tokens']:.0f} s/1k)"
                                                          if v.get("absorb_seconds_per_1k_tokens") else "")
                            for k, v in s.items()), flush=True)
    elif n.startswith("tune") and tune_recall(n) is not None:
        row = json.loads((work / f"{n}.jsonl").read_text().splitlines()[-1])
        print(n, f"recall {row['recall']:.3f} sentence {row['sentence']:.3f} by window {row['by_window']} "
                 f"{row['seconds']:.0f}s n={row['n']}", flush=True)
out = os.environ.get("OUT")
if out:
    with tarfile.open(Path(out) / "gpu_runs.tar.gz", "w:gz") as tf:
        tf.add(work, arcname="gpu_runs", filter=lambda ti: None if ti.name.endswith(".safetensors") else ti)
print(f"[{time.time() - t_start:5.0f}s] end", flush=True)
