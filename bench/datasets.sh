#!/usr/bin/env bash
# Data pipeline speed: cnx's COCO train pipeline vs mmdet 2.x's own pipeline (cv2/numpy) on the
# same images (coco-tiny), 1 and 2 threads/workers, with and without instance masks; and parsing
# an instances JSON the size of instances_train2017 (cnx data stats vs pycocotools COCO()),
# wall time and peak RSS. One run each; prints the table and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BIN=${BIN:-target/release/cnx}
COCO=${COCO:-tests/data/coco-tiny}
N=${N:-160}
BIG=${BIG:-target/bench-data/datasets/instances_big.json}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
[ -x "$BIN" ] || { echo "build cnx first (make build)"; exit 1; }
ANN="$COCO/annotations/instances_train2017.json"
IMG="$COCO/train2017"
for masks in nomask mask; do
  flag=""; [ "$masks" = mask ] && flag="--masks"
  for t in 1 2; do
    echo "== pipeline $masks threads=$t: mmdet"
    timeout 600 "$PY" bench/datasets.py pipeline "$ANN" "$IMG" "$N" "$t" $flag | tee "$OUT/py.$masks.$t.json"
    echo "== pipeline $masks threads=$t: cnx"
    "$BIN" data bench-pipeline --coco "$ANN" --images "$IMG" -n "$N" --threads "$t" $flag | tee "$OUT/rs.$masks.$t.json"
  done
done
if [ "${SKIP_PARSE:-0}" != 1 ]; then
  if [ ! -f "$BIG" ]; then
    echo "generating $BIG (once, a few minutes)"
    mkdir -p "$(dirname "$BIG")"
    "$PY" bench/datasets.py gen-big "$BIG"
  fi
  ls -la "$BIG"
  echo "== parse: pycocotools"
  /usr/bin/time -v -o "$OUT/parse.py.time" "$PY" bench/datasets.py parse "$BIG" | tee "$OUT/parse.py.json"
  echo "== parse: cnx data stats"
  /usr/bin/time -v -o "$OUT/parse.rs.time" "$BIN" data stats --coco "$BIG" --json > "$OUT/parse.rs.full.json"
  "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps({k: d[k] for k in ('images','annotations','crowd','categories','parse_seconds','peak_rss_mib')}))" "$OUT/parse.rs.full.json" | tee "$OUT/parse.rs.json"
fi
"$PY" bench/datasets.py report "$OUT"
