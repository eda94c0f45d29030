#!/bin/bash
# The paper's own test on held-out text (README, "Continuation fidelity"): three kinds of text x 8
# segments, C = 512 context tokens absorbed, E = 128 unseen tokens scored; no window (W = 0) and a
# 128-token window. The texts are the report set (bench/texts/SOURCES.md); the levers were chosen
# on the tune set (bench/texts/tune_*, Northanger Abbey), never on these.
#
#   bash bench/continuation_report.sh [OUT]          # about 1.5 hours on 2 cores (two jobs at a time)
#
# NOVEL defaults to Persuasion from ../shared/data (a developer machine); any long UTF-8 novel works.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/continuation}
NOVEL=${NOVEL:-../shared/data/austen/persuasion.txt}
[ -f "$NOVEL" ] || { echo "continuation_report.sh: no novel at $NOVEL; set NOVEL=path/to/novel.txt" >&2; exit 2; }
mkdir -p "$(dirname "$OUT")"
DOCS="$NOVEL bench/texts/technical_rust_book_ch04.md bench/texts/dialogue_shakespeare.txt"
LM="--only lm --docs $DOCS --context 512 --eval-len 128 --steps 10 --threads 1"
# W = 0: the absorbing methods at equal steps (absorb.py's raw-text defaults otherwise). W = 128: window vs
# absorbed + window; there every Y sequence is the window + a sample (8 x 192 tokens), so each step takes a
# random 512 of them (--batch-tokens 512) to stay within the same seconds per step
# (the default recipe and logits-only KL on 8 segments per kind; absorbed + window on 4, the L1 and NTP
# baselines on 2 per kind, to fit one session on 2 cores)
python eval.py $LM --lm-segments 8 --window 0 --methods hybrid,kl --out "$OUT/w0_a" > "$OUT.w0_a.log" 2>&1 &
python eval.py $LM --lm-segments 4 --window 128 --batch-tokens 512 --methods window,hybrid --out "$OUT/w128" \
  > "$OUT.w128.log" 2>&1
wait
python eval.py $LM --lm-segments 2 --window 0 --methods absorber,ntp --out "$OUT/w0_b" > "$OUT.w0_b.log" 2>&1
python bench/continuation_frontier.py "$OUT"/w0_a/results.json "$OUT"/w0_b/results.json "$OUT"/w128/results.json
