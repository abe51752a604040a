#!/usr/bin/env bash
# The main job on the embedded sample data: generate -> pair -> (degrade -> pair) -> (train on a tiny model).
# Run through `make demo`, which puts the project's venv first on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo_out}
rm -rf "$OUT"
mkdir -p "$OUT"
export KONTEXT_CACHE_DIR="$OUT/.cache"

echo "== 1. Generate the sample edit dataset (32 synthetic scenes) =="
python examples/make_sample.py "$OUT/sample"

echo
echo "== 2. Pair edited/ with reference/ and write the manifest =="
kontext-data pair "$OUT/sample/edited" "$OUT/sample/reference" \
  --out "$OUT/manifest.parquet" --resolution 128 --eval-fraction 0.125 --report "$OUT/pair_report.json"

for step in examples/demo_*.sh; do
  [ -e "$step" ] || continue
  echo
  bash "$step" "$OUT/manifest.parquet" "$OUT"
done

echo
echo "Manifest: $OUT/manifest.parquet   (open it with pandas.read_parquet, DuckDB or datasets)"
echo "Report:   $OUT/pair_report.json"
