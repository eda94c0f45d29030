"""Per-kind summary of an eval.py lm run from its log (stderr), for runs stopped before they wrote
results.json: each finished segment's per-method line gives NLL, KL(full || method) and recovered,
from which KL(full || none) = KL / (1 - recovered); recovered over segments = 1 - mean KL / mean
KL_none, as eval.py computes it (no intervals: too few segments).

    python bench/lm_log_summary.py runs/continuation/w128.log
"""
import re
import sys
from pathlib import Path

SEG = re.compile(r"\[lm\] (\S+) segment")
ROW = re.compile(r"\[lm\]   (.+?)\s+NLL ([\d.]+)\s+KL ([\d.]+)\s+recovered ([-\d.]+)(?:.*in (\d+)s\))?")


def main(argv=None) -> int:
    paths = [Path(a) for a in (argv if argv is not None else sys.argv[1:])]
    if not paths or not all(p.is_file() for p in paths):
        print("usage: lm_log_summary.py LOG [LOG ...] (existing eval.py lm logs)", file=sys.stderr)
        return 2
    for path in paths:
        doc, rows = None, {}
        for line in path.read_text().splitlines():
            if m := SEG.match(line):
                doc = m.group(1)
            elif (m := ROW.match(line)) and float(m.group(4)) != 1.0:
                kl, rec = float(m.group(3)), float(m.group(4))
                rows.setdefault((doc, m.group(1).strip()), []).append((float(m.group(2)), kl, kl / (1 - rec),
                                                                        int(m.group(5) or 0)))
        print(f"{path}\n| text | method | segments | NLL | KL | recovered | absorb s / segment |\n|---|---|---|---|---|---|---|")
        for (d, name), v in rows.items():
            n = len(v)
            secs = sum(x[3] for x in v) / n
            print(f"| {d} | {name} | {n} | {sum(x[0] for x in v) / n:.3f} | {sum(x[1] for x in v) / n:.3f} | "
                  f"{1 - sum(x[1] for x in v) / sum(x[2] for x in v):.3f} | {f'{secs:.0f}' if secs else ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
