#!/usr/bin/env bash
# Demo step: synthetic references from the clean sample images (deblur, JPEG artifacts, on demand), each paired.
# Called by examples/demo.sh with MANIFEST and OUTDIR.
set -euo pipefail
OUT=$2
echo "== Degrade -> pair: references synthesized from the edited images =="
kontext-data degrade "$OUT/sample/edited" --type blur --blur-radius 2 --caption deblur --caption "sharpen image" \
  --out "$OUT/refs_deblur"
kontext-data pair "$OUT/sample/edited" "$OUT/refs_deblur" --out "$OUT/manifest_deblur.parquet" --resolution 128 --quiet
kontext-data degrade "$OUT/sample/edited" --type jpeg_artifacts --quality-mode range --quality-range 10-30 \
  --compression-rounds 2 --caption "remove compression artifacts" --out "$OUT/refs_jpeg"
kontext-data pair "$OUT/sample/edited" "$OUT/refs_jpeg" --match stem --out "$OUT/manifest_jpeg.parquet" --resolution 128 --quiet
kontext-data degrade "$OUT/sample/edited" --type jpeg --quality 15 --on-demand --out "$OUT/refs_on_demand"
kontext-data pair "$OUT/sample/edited" "$OUT/refs_on_demand" --out "$OUT/manifest_on_demand.parquet" --resolution 128 --quiet
echo "References: $OUT/refs_deblur (PNG), $OUT/refs_jpeg (JPEG), $OUT/refs_on_demand (records only: synthesized at load time)"
