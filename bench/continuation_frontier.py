"""The paper's test across runs: recovered = 1 - KL(full || method) / KL(full || none) on unseen
continuations, per kind of text, against absorption seconds per 1k tokens, from the results.json
of several `eval.py --only lm` runs (each a lever or a recipe). Prints one row per (run, method)
and writes a frontier plot. With --versus M: paired comparisons on the same segments (runs with
equal window merged by document and segment): per kind, the mean KL(full || other) - KL(full || M)
with a 95% bootstrap interval over segments and how many segments M wins (positive: M is closer
to the full-context model).

    python bench/continuation_frontier.py runs/cont/*/results.json --out docs/results/continuation_frontier.png
    python bench/continuation_frontier.py runs/c3/*/results.json --versus hybrid
"""
import argparse
import json
import math
import sys
from pathlib import Path

from nanoabsorber.io import atomic_path
from nanoabsorber.metrics import bootstrap_ci


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


def segments_by_window(paths: list) -> dict:
    """{window: {(document, segment): {method: kl}}} merged over runs; a method that an earlier run
    with the same window also has is named "method@run" (e.g. NTP at two learning rates).
    ValueError when two runs disagree on a segment's no-context KL (not the same segments: other
    C, E or texts)."""
    out, owner = {}, {}
    for path in paths:
        res = json.loads(path.read_text())
        window, run = res["config"]["window"], path.parent.name
        for seg in res["lm"]["segments"]:
            key = (seg["document"], seg["segment"])
            row = out.setdefault(window, {}).setdefault(key, {})
            kls = {m: v["kl"] for m, v in seg["methods"].items()}
            if "none" in row and abs(row["none"] - kls["none"]) > 1e-3 * max(1.0, abs(kls["none"])):
                raise ValueError(f"{path}: segment {key} differs from an earlier run's (other --context, "
                                 "--eval-len or texts); compare runs made with the same segment flags")
            for m, v in kls.items():
                if m not in ("none", "full") and owner.setdefault((window, m), run) != run:
                    m = f"{m}@{run}"
                row[m] = v
            row.setdefault("none", kls["none"])
    return out


def paired(rows: dict, ref: str, seed: int = 0) -> list:
    """[(window, other, kind, n, mean KL_other - KL_ref, CI, wins of ref)] over the segments that hold both."""
    out = []
    for window, segs in sorted(rows.items()):
        methods = sorted({m for r in segs.values() for m in r} - {ref, "full"})
        for other in methods:
            kinds = sorted({d for d, _ in segs})
            for kind in kinds + ["all"]:
                d = [r[other] - r[ref] for (doc, _), r in segs.items() if ref in r and other in r
                     and kind in (doc, "all")]
                if d:
                    out.append((window, other, kind, len(d), sum(d) / len(d),
                                bootstrap_ci(d, lambda x: sum(x) / len(x), seed=seed), sum(x > 0 for x in d)))
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
    p.add_argument("--versus", default=None, help="method for paired per-segment KL comparisons (e.g. hybrid)")
    a = p.parse_args(argv)
    missing = [str(r) for r in a.results if not r.is_file()]
    if missing:
        print(f"continuation_frontier.py: no such file: {missing[0]}", file=sys.stderr)
        return 2
    try:
        rows = [r for path in a.results for r in rows_of(path)]
    except (ValueError, KeyError, TypeError) as e:   # json.JSONDecodeError is a ValueError
        print(f"continuation_frontier.py: not the results.json of an eval.py --only lm run ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 2
    kinds = sorted({k for r in rows for k in r["kinds"]})
    print("| run | method | W | steps | s / 1k tok | all | " + " | ".join(kinds) + " |")
    print("|---" * (6 + len(kinds)) + "|")
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        print(f"| {r['run']} | {r['label']} | {r['window']} | {r['steps']} | {secs} | {cell(r['all'])} | "
              + " | ".join(cell(r["kinds"].get(k, (None, None))) for k in kinds) + " |")
    if a.versus:
        try:
            comp = paired(segments_by_window(a.results), a.versus)
        except ValueError as e:
            print(f"continuation_frontier.py: {e}", file=sys.stderr)
            return 2
        if not comp:
            print(f"continuation_frontier.py: no segment holds method {a.versus!r}", file=sys.stderr)
            return 2
        print(f"\nPaired on the same segments: KL(full || other) - KL(full || {a.versus}) "
              f"(> 0: {a.versus} closer to the full-context model), 95% bootstrap CI, segments {a.versus} wins\n")
        print("| W | other | text | segments | mean KL difference | 95% CI | wins |\n|---|---|---|---|---|---|---|")
        for w, other, kind, n, m, (lo, hi), wins in comp:
            ci = "n/a" if math.isnan(lo) else f"[{lo:+.3f}, {hi:+.3f}]"
            print(f"| {w} | {other} | {kind} | {n} | {m:+.3f} | {ci} | {wins}/{n} |")
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
