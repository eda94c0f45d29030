"""Compare recipes run by bench/long_window_tune.py on the same tuning documents.

    python bench/tune_compare.py docs/results/replay/tune.jsonl --by replay,replay_share

Groups the JSON lines by the given cfg fields; per group: recall per document, its mean over the
documents, mean recall by the window an entry starts in, seconds per 1k tokens. Against the first
group: the difference of the means with a 95% interval, paired over the same questions where both
logs hold per-question scores ("scores", written since 2026-12-01), else from the documents'
binomial variances (independent proportions; the questions are the same, so this is conservative)."""
import argparse
import json
import math
from collections import defaultdict

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("log")
p.add_argument("--by", default="replay,replay_share", help="comma list of cfg fields that name a recipe")
args = p.parse_args()
keys = [k.strip() for k in args.by.split(",") if k.strip()]
groups, n = defaultdict(dict), 0
try:
    for n, line in enumerate(open(args.log), 1):
        row = json.loads(line)
        missing = [k for k in ("seed", "cfg", "recall", "n", "by_window", "seconds", "tokens") if k not in row]
        if missing:
            raise KeyError(", ".join(missing))
        groups[tuple(row["cfg"].get(k) for k in keys)][row["seed"]] = row
except (OSError, ValueError, KeyError, TypeError) as e:
    p.error(f"{args.log}: {f'line {n}: ' if n else ''}not a long_window_tune log ({e!r})")


def paired(a: dict, b: dict):
    """(mean difference b - a, its variance) over the documents both ran, from per-question score
    differences; None where a document lacks scores or its questions differ."""
    docs = sorted(set(a) & set(b))
    if not docs or any(len(a[s].get("scores", [])) != len(b[s].get("scores", [])) or not a[s].get("scores")
                       for s in docs):
        return None
    means, var = [], 0.0
    for s in docs:
        d = [y - x for x, y in zip(a[s]["scores"], b[s]["scores"])]
        mu = sum(d) / len(d)
        means.append(mu)
        var += sum((v - mu) ** 2 for v in d) / max(len(d) - 1, 1) / len(d)
    return sum(means) / len(docs), var / len(docs) ** 2


base = None
for name, docs in groups.items():
    rows = [docs[s] for s in sorted(docs)]
    m = sum(r["recall"] for r in rows) / len(rows)
    var = sum(r["recall"] * (1 - r["recall"]) / r["n"] for r in rows) / len(rows) ** 2
    wins = sorted({w for r in rows for w in r["by_window"]}, key=int)
    by_w = " / ".join(f"{sum(r['by_window'].get(w, 0) for r in rows) / len(rows):.2f}" for w in wins)
    cost = sum(r["seconds"] / r["tokens"] * 1000 for r in rows) / len(rows)
    recipe = ", ".join(f"{k} {v}" for k, v in zip(keys, name))
    per_doc = " / ".join(f"doc {s} {docs[s]['recall']:.3f}" for s in sorted(docs))
    line = f"{recipe}: recall {m:.3f} ({per_doc}), by window {by_w}, {cost:.0f} s / 1k tokens"
    if base is None:
        base = (m, var, docs)
    elif (pd := paired(base[2], docs)) is not None:
        d, half = pd[0], 1.96 * math.sqrt(pd[1])
        line += f"; vs the first (paired by question): {d:+.3f} [{d - half:+.3f}, {d + half:+.3f}]"
    else:
        d, half = m - base[0], 1.96 * math.sqrt(var + base[1])
        line += f"; vs the first (unpaired): {d:+.3f} [{d - half:+.3f}, {d + half:+.3f}]"
    print(line)
