"""The paper's test across runs: recovered = 1 - KL(full || method) / KL(full || none) on unseen
continuations, per kind of text, against absorption seconds per 1k tokens, from the results.json
of several `eval.py --only lm` runs (each a lever or a recipe). Prints one row per (run, method)
and writes a frontier plot.

    python bench/continuation_frontier.py runs/cont/*/results.json --out docs/results/continuation_frontier.png
"""
import argparse
import json
import math
import sys
from pathlib import Path

from nanoabsorber.io import atomic_path


def rows_of(path: Path) -> list[dict]:
    res = json.loads(path.read_text())
    lm, cfg = res["lm"], res["config"]
    out = []
    for name, s in lm["summary"].items():
        if s.get("absorb_seconds_per_1k_tokens") is None and name not in ("window", "none"):
            continue
        out.append({"run": path.parent.name, "method": name, "label": s["label"], "window": cfg["window"],
                    "steps": cfg["steps"], "all": (s["recovered"], s["recovered_ci"]),
                    "kinds": {d: (v[name]["recovered"], v[name]["recovered_ci"]) for d, v in lm["by_document"].items()},
                    "seconds": s["absorb_seconds_per_1k_tokens"]})
    return out


def cell(v) -> str:
    x, (lo, hi) = v[0], v[1] or (None, None)
    if x is None:
        return "n/a"
    return f"{x:.3f}" + ("" if lo is None else f" [{lo:.2f}, {hi:.2f}]")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="PNG of recovered vs seconds per 1k tokens")
    a = p.parse_args(argv)
    missing = [str(r) for r in a.results if not r.is_file()]
    if missing:
        print(f"continuation_frontier.py: no such file: {missing[0]}", file=sys.stderr)
        return 2
    rows = [r for path in a.results for r in rows_of(path)]
    kinds = sorted({k for r in rows for k in r["kinds"]})
    print("| run | method | W | steps | s / 1k tok | all | " + " | ".join(kinds) + " |")
    print("|---" * (6 + len(kinds)) + "|")
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        print(f"| {r['run']} | {r['label']} | {r['window']} | {r['steps']} | {secs} | {cell(r['all'])} | "
              + " | ".join(cell(r["kinds"].get(k, (None, None))) for k in kinds) + " |")
    if a.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        pts = [r for r in rows if r["seconds"] is not None and r["all"][0] is not None]
        for r in pts:
            lo, hi = r["all"][1] or (math.nan, math.nan)
            ax.errorbar(r["seconds"], r["all"][0], yerr=[[r["all"][0] - lo], [hi - r["all"][0]]], fmt="o",
                        capsize=3, label=f"{r['run']}: {r['label']}")
        ax.axhline(0, color="grey", lw=1)
        ax.axhline(0.5, color="black", lw=1, ls="--")
        ax.set_xlabel("absorption seconds per 1k tokens (2 CPU cores)")
        ax.set_ylabel("recovered 1 - KL/KL_none (all kinds, 95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        with atomic_path(a.out) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
