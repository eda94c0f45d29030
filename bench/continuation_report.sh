#!/bin/bash
# The paper's own test on held-out text (README, "Continuation fidelity"): three kinds of text x 8
# segments, C = 512 context tokens absorbed, E = 128 unseen tokens scored; no window (W = 0) and a
# 128-token window. The texts are the report set (bench/texts/SOURCES.md); the levers (and NTP's
# learning rate) were chosen on the tune set (bench/texts/tune_*, Northanger Abbey), never on these.
#
#   bash bench/continuation_report.sh [OUT]      # about 2 hours on 2 cores (two jobs at a time)
#
# NOVEL defaults to Persuasion from ../shared/data (a developer machine); any long UTF-8 novel works.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/continuation}
NOVEL=${NOVEL:-../shared/data/austen/persuasion.txt}
NTP_LR=${NTP_LR:-1e-4}    # NTP's best learning rate on the tune set (docs/results/continuation_tuning.md)
[ -f "$NOVEL" ] || { echo "continuation_report.sh: no novel at $NOVEL; set NOVEL=path/to/novel.txt" >&2; exit 2; }
mkdir -p "$OUT"
DOCS="$NOVEL bench/texts/technical_rust_book_ch04.md bench/texts/dialogue_shakespeare.txt"
LM="--only lm --docs $DOCS --context 512 --eval-len 128 --steps 10 --threads 1 --lm-segments 8"
run() { local name=$1; shift; python eval.py $LM "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1; }
# W = 0: every absorbing method at equal steps (absorb.py's raw-text defaults otherwise; NTP also at its
# own tuned lr). W = 128: window vs absorbed + window; there every Y sequence is the window + a sample
# (8 x 192 tokens), so each step takes a random 512 of them (--batch-tokens 512).
run w0_a --window 0 --methods hybrid,kl &
run w128 --window 128 --batch-tokens 512 --methods window,hybrid
wait
run w0_b --window 0 --methods absorber,ntp &
run w0_ntp --window 0 --methods ntp --lr "$NTP_LR"
wait
python bench/continuation_frontier.py "$OUT"/{w0_a,w0_b,w0_ntp,w128}/results.json --versus hybrid
