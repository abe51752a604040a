#!/usr/bin/env bash
# Demo step: look at the dataset (counts, buckets, duplicates), check the content of every pair, and write a preview.
# Called by examples/demo.sh with MANIFEST and OUTDIR.
set -euo pipefail
MANIFEST=$1
OUT=$2
echo "== Inspect, check and preview the manifest =="
kontext-data inspect "$MANIFEST" --plots "$OUT/plots" || true   # exit 1 only flags duplicates / missing files
kontext-data check "$MANIFEST" --report "$OUT/check.json" || true  # exit 1 only flags suspicious pairs
kontext-data preview "$MANIFEST" --out "$OUT/preview.html" --sort worst
echo "Preview: $OUT/preview.html (open it in a browser)   Plots: $OUT/plots/   Content check: $OUT/check.json"
