"""Long-document recall over seeds: the mean (and per-seed values) of each method's recall with a
95% bootstrap interval over the questions of all seeds, overall and per third of the document,
retention (right after the answer's window / after the last), with absorption seconds per 1k
tokens and peak memory, from the results.json of several `eval.py --only long --seed S` runs
(fresh documents each seed).

    python bench/long_seeds.py runs/long_seed0/results.json runs/long_seed1/results.json runs/long_seed2/results.json
"""
import argparse
import json
import sys
from pathlib import Path

THIRDS = ("beginning", "middle", "end")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path)
    a = p.parse_args(argv)
    missing = [str(r) for r in a.results if not r.is_file()]
    if missing:
        print(f"long_seeds.py: no such file: {missing[0]}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from nanoabsorber.metrics import bootstrap_ci

    longs = [json.loads(r.read_text())["long"] for r in a.results]
    runs = [lg["summary"] for lg in longs]
    rows_of = lambda name: [r for lg in longs for r in lg["rows"]   # noqa: E731
                            if r["method"] == name and r.get("prediction") is not None]
    n_q = sum(next(iter(s.values()))["n"] for s in runs)
    print(f"{len(runs)} seed(s), {n_q} questions per method in all")
    print("| method | recall [95% CI] (per seed) | first sentence | " + " | ".join(THIRDS)
          + " | retention: right after its window / after the last | absorb s / 1k tok | peak +MiB |")
    print("|---" * (7 + len(THIRDS)) + "|")
    for name in runs[0]:
        rows = [s[name] for s in runs if name in s]
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        secs = [r["absorb_seconds_per_1k_tokens"] for r in rows if r["absorb_seconds_per_1k_tokens"]]
        mem = [r["absorb_peak_extra_bytes"] / 2 ** 20 for r in rows if r.get("absorb_peak_extra_bytes")]
        per_seed = " / ".join(f"{r['lenient']:.2f}" for r in rows)
        lo, hi = bootstrap_ci(rows_of(name), lambda qs: sum(q["lenient"] for q in qs) / len(qs))
        ret = [r["retention"] for r in rows if r.get("retention")]
        ret_s = (f"{mean([x['right_after_its_window'] for x in ret]):.2f} / "
                 f"{mean([x['after_the_last_window'] for x in ret]):.2f}") if ret else ""
        print(f"| {rows[0]['label']} | {mean([r['lenient'] for r in rows]):.2f} [{lo:.2f}, {hi:.2f}] ({per_seed}) | "
              f"{mean([r['sentence'] for r in rows]):.2f} | "
              + " | ".join(f"{mean([r['by_third'][t] for r in rows if t in r['by_third']]):.2f}" for t in THIRDS)
              + f" | {ret_s} | {f'{mean(secs):.0f}' if secs else ''} | {f'{max(mem):.0f}' if mem else ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
