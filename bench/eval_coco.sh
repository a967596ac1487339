#!/usr/bin/env bash
# COCO evaluation speed: `cnx-eval coco` (the libtorch-free binary) vs pycocotools vs
# faster-coco-eval on a generated val2017-scale workload (5,000 images, ~36k GT, 100
# detections/image, boxes and RLE masks), bbox and segm separately, each in its own process with
# loading included; `cnx eval coco` (same code, plus libtorch's load) as an extra row when the
# cnx binary is built. Prints wall time, peak RSS, the speed-up over pycocotools and the
# largest difference of the 12 stats.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BIN=${BIN:-target/release/cnx-eval}
CNX=${CNX:-target/release/cnx}
DATA=${DATA:-target/bench-data/eval_coco}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
[ -x "$BIN" ] || { echo "build cnx-eval first (make build)"; exit 1; }
if [ ! -f "$DATA/results_segm.json" ]; then
  echo "generating workload in $DATA (once, ~1-2 min)"
  "$PY" bench/eval_coco.py gen "$DATA"
fi
ls -la "$DATA"
T="/usr/bin/time -v"
for t in bbox segm; do
  RES="$DATA/results_$t.json"
  echo "== $t: pycocotools"
  $T -o "$OUT/pycocotools.$t.time" "$PY" bench/eval_coco.py pycocotools "$DATA/gt.json" "$RES" "$t" "$OUT/pycocotools.$t.stats.json"
  echo "== $t: faster-coco-eval"
  $T -o "$OUT/faster-coco-eval.$t.time" "$PY" bench/eval_coco.py faster "$DATA/gt.json" "$RES" "$t" "$OUT/faster-coco-eval.$t.stats.json"
  echo "== $t: cnx-eval coco"
  $T -o "$OUT/cnx-eval.$t.time" "$BIN" coco --gt "$DATA/gt.json" --results "$RES" --iou-type "$t" --json > "$OUT/cnx-eval.$t.stats.json"
  if [ -x "$CNX" ]; then
    echo "== $t: cnx eval coco"
    $T -o "$OUT/cnx.$t.time" "$CNX" eval coco --gt "$DATA/gt.json" --results "$RES" --iou-type "$t" --json > "$OUT/cnx.$t.stats.json"
  fi
done
"$PY" bench/eval_coco.py report "$OUT"
