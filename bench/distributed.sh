#!/usr/bin/env bash
# Data-parallel training throughput on the CPU: the demo Mask R-CNN (ConvNeXt nano) on
# synthetic COCO data, the same global batch of 2 images per step run as
#   1 process  x 2 images, 1 thread    (the single-process baseline on one core)
#   1 process  x 2 images, 2 threads   (the same two cores used by intra-op threads instead)
#   2 ranks    x 1 image,  1 thread each (--nproc-per-node 2, Gloo)
# plus 1 process x 1 image, 1 thread: the per-rank work of the 2-rank run without any
# collective. Images/s and s/step are the medians of rank 0's log.jsonl records after WARMUP
# iterations (`images_per_s`, `time`; global images). The collective share of the 2-rank step
# is estimated as (t_2ranks - t_1x1) / t_2ranks: the gradient all-reduce, the loss/count/shape
# all-reduces and the wait for the slower rank together (not split further; not the all-reduce
# alone). On a shared machine the numbers move; run it with nothing else busy.
# Env: STEPS (30), WARMUP (5), SCALE (image side, 256 as the preset), IMAGES (synthetic set
# size, 40), BIN (target/release/cnx), BENCH_DIR (target/bench-distributed).
set -euo pipefail
cd "$(dirname "$0")/.."
export VIRTUAL_ENV=$PWD/.venv PATH=$PWD/.venv/bin:$PATH LIBTORCH_USE_PYTORCH=1
BIN=${BIN:-target/release/cnx}
STEPS=${STEPS:-30}
WARMUP=${WARMUP:-5}
SCALE=${SCALE:-256}
IMAGES=${IMAGES:-40}
DIR=${BENCH_DIR:-target/bench-distributed}
[ -x "$BIN" ] || { echo "build cnx first: cargo build --release --bin cnx" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || echo "warning: $(nproc) core(s); 2 ranks share one" >&2
mkdir -p "$DIR"
DATA=$DIR/data
[ -f "$DATA/annotations/instances_train.json" ] || "$BIN" data synth coco --out "$DATA" --images "$IMAGES" >/dev/null

# run NAME BATCH THREADS NPROC: one training run into $DIR/NAME; prints "images/s s/step".
run() {
  local name=$1 batch=$2 threads=$3 nproc=$4 work=$DIR/$1
  rm -rf "$work"
  "$BIN" train demo_mask_rcnn_convnext_nano \
    --set "data.root=$DATA" --set "data.img_scale=[$SCALE, $SCALE]" \
    --set "data.batch_size=$batch" --set "runtime.threads=$threads" --set data.workers=1 \
    --set runtime.log_interval=1 --set runtime.max_iters=100000 \
    --set runtime.checkpoint_interval=0 \
    --device cpu --no-eval --stop-at "$STEPS" --nproc-per-node "$nproc" \
    --work-dir "$work" >"$work.out" 2>&1 || { echo "$name failed:" >&2; tail -20 "$work.out" >&2; exit 1; }
  python3 - "$work/log.jsonl" "$WARMUP" <<'EOF'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
recs = [r for r in recs if r.get("mode") == "train" and r["iter"] > int(sys.argv[2])]
print(f'{statistics.median(r["images_per_s"] for r in recs):.3f} {statistics.median(r["time"] for r in recs):.4f}')
EOF
}

read -r IPS_1T T_1T < <(run p1_b2_t1 2 1 1)
read -r IPS_2T T_2T < <(run p1_b2_t2 2 2 1)
read -r IPS_DP T_DP < <(run p2_b1_t1 1 1 2)
read -r IPS_B1 T_B1 < <(run p1_b1_t1 1 1 1)

echo "demo Mask R-CNN (ConvNeXt nano), CPU, ${SCALE}x${SCALE}, global batch 2, $STEPS steps (median after $WARMUP)"
printf "  %-36s %10s %10s\n" "configuration" "images/s" "s/step"
printf "  %-36s %10s %10s\n" "1 process x 2 images, 1 thread" "$IPS_1T" "$T_1T"
printf "  %-36s %10s %10s\n" "1 process x 2 images, 2 threads" "$IPS_2T" "$T_2T"
printf "  %-36s %10s %10s\n" "2 ranks x 1 image, 1 thread (Gloo)" "$IPS_DP" "$T_DP"
printf "  %-36s %10s %10s\n" "1 process x 1 image, 1 thread" "$IPS_B1" "$T_B1"
python3 - "$IPS_1T" "$IPS_2T" "$IPS_DP" "$T_DP" "$T_B1" <<'EOF'
import sys
i1, i2, dp, tdp, tb1 = map(float, sys.argv[1:])
print(f"  ratio 2 ranks / 1 process (1 thread):   {dp / i1:6.2f}x")
print(f"  ratio 2 ranks / 1 process (2 threads):  {dp / i2:6.2f}x")
print(f"  collective + wait share of a 2-rank step: {max(tdp - tb1, 0) / tdp:6.1%}"
      f"  ((t_2ranks {tdp:.3f} s - t_1x1 {tb1:.3f} s) / t_2ranks)")
EOF
