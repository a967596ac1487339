#!/usr/bin/env bash
# UperNet + ConvNeXt-T CPU inference of one 512x2048 image (eval, no grad), whole-image and
# sliding-window (crop 512, stride 341): ours (tch) vs mmsegmentation 0.30's EncoderDecoder on the
# same architecture, same thread count, in one run; prints both medians and ours/reference
# (goal ≤ 1.0). Env: BENCH_RUNS (3), BENCH_WARMUP (1), BENCH_THREADS (all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
THREADS="${BENCH_THREADS:-$(nproc)}"
RUNS="${BENCH_RUNS:-3}"
WARMUP="${BENCH_WARMUP:-1}"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
cargo build --release -q -p cnx-heads --example bench_segmentation
# Alternate the two implementations mode by mode so a change in machine load hits both alike.
ours=""; ref=""
for m in whole slide; do
  ours+=$(target/release/examples/bench_segmentation "$RUNS" "$WARMUP" "$m")$'\n'
  ref+=$(.venv/bin/python bench/segmentation.py "$RUNS" "$WARMUP" "$m" 2>/dev/null)$'\n'
done
printf '%-8s %12s %12s %8s\n' mode "ours ms" "mmseg ms" ratio
for m in whole slide; do
  o=$(awk -v m="$m" '$1==m{print $2}' <<<"$ours")
  r=$(awk -v m="$m" '$1==m{print $2}' <<<"$ref")
  printf '%-8s %12s %12s %8.3f\n' "$m" "$o" "$r" "$(awk -v o="$o" -v r="$r" 'BEGIN{print o/r}')"
done
echo "(upernet_convnext_tiny_512_160k, 1x3x512x2048, ${THREADS} threads, median of ${RUNS} after ${WARMUP} warmup)"
