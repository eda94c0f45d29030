"""Issue 10 on a lent GPU: the long-document benchmark on the report seeds (0, 1, 2) at 4k and 2k
tokens with absorb.py's default recipe, run side by side as separate processes under one deadline.

    python bench/gpu_long.py --deadline 480 --work /tmp/gpu_runs [--device cuda]

  report  eval.py --only long --long-lengths L --methods hybrid,ntp --seed S, L = 4096, 2048, S = 0, 1, 2:
          the default recipe on fresh catalogues, never used for tuning (the replay recipe, --replay 64
          --replay-share 0.33, was chosen on the CPU from tuning documents 100 and 101:
          docs/results/replay/)
  demo    absorb.py --device cuda (the README's demo: 8 questions)
The 4k seeds start first; the 2k seeds only with --waves 2 and when the 4k wave left time for them.

`--micro-tokens 1024` everywhere (one forward/backward per step of 512 Y tokens; the default 256
is a CPU memory setting and gives the same gradient up to float summation order). Every process
writes its log and results under --work; on the deadline the rest are killed (their logs kept).
At the end --work is packed into $OUT/gpu_runs.tar.gz and a summary is printed.

Seen on 2026-11-30 (one H200, docs/results/gpu_2026-11-30.md): with these 8 processes sharing the GPU
a step of 512 Y tokens took 2.1-2.8 s, so a 560 s deadline ended wave 1 in the second of five windows
of the 4k documents (the demo finished); 4 processes here instead of 8. The replay lever it also
tuned then moved to the CPU (docs/results/replay/). Next time: time one process alone for a minute first.
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


wave1 = [report(s, 4096) for s in (0, 1, 2)]
wave1 += [("demo", [py, "absorb.py", "--device", args.device, "--out", str(work / "demo.safetensors")])]
procs = launch(wave1)
ok = wait(procs)
done_msg(procs)
t1 = time.time() - t_start
print(f"[{t1:5.0f}s] wave 1 finished: {'all done' if ok else 'deadline hit'}", flush=True)
if ok and args.waves > 1 and args.deadline - t1 >= 1.1 * t1:
    procs2 = launch([report(s, 2048) for s in (0, 1, 2)])
    wait(procs2)
    done_msg(procs2)
    procs.update(procs2)
elif args.waves > 1:
    print(f"wave 2 not started: {args.deadline - t1:.0f}s left, wave 1 took {t1:.0f}s", flush=True)

# summary: every finished report and tuning run
for n in sorted(procs):
    res = work / n / "results.json"
    if res.exists():
        s = json.loads(res.read_text())["long"]["summary"]
        print(n, "  ".join(f"{k} {v['lenient']:.2f}" + (f" ({v['absorb_seconds_per_1k_tokens']:.0f} s/1k)"
                                                          if v.get("absorb_seconds_per_1k_tokens") else "")
                            for k, v in s.items()), flush=True)
out = os.environ.get("OUT")
if out:
    with tarfile.open(Path(out) / "gpu_runs.tar.gz", "w:gz") as tf:
        tf.add(work, arcname="gpu_runs", filter=lambda ti: None if ti.name.endswith(".safetensors") else ti)
print(f"[{time.time() - t_start:5.0f}s] end", flush=True)
