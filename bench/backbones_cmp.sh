#!/usr/bin/env bash
# Swin-T and ResNet-50 forward on CPU (batch 8, 224x224, eval, no grad): ours (tch) vs timm /
# torchvision, same thread count, in one run; prints both medians and ours/reference (target ≤ 1.05).
# Env: BENCH_BATCH (8), BENCH_RUNS (5), BENCH_ROUNDS (2), BENCH_THREADS (all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
THREADS="${BENCH_THREADS:-$(nproc)}"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
cargo build --release -q -p cnx-backbone --example bench_backbones
# Alternate ours / reference ROUNDS times and keep each side's best median, so a load spike on a
# shared machine does not land on one side only.
ROUNDS="${BENCH_ROUNDS:-2}"
ours=""; ref=""
for _ in $(seq "$ROUNDS"); do
  ours+=$(target/release/examples/bench_backbones swin_tiny resnet50)$'\n'
  ref+=$(.venv/bin/python bench/backbones_cmp.py swin_tiny resnet50)$'\n'
done
best() { awk -v m="$1" '$1==m{ if (b=="" || $2<b) b=$2 } END{print b}'; }
printf '%-10s %12s %12s %8s\n' model "ours ms" "ref ms" ratio
for m in swin_tiny resnet50; do
  o=$(best "$m" <<<"$ours")
  r=$(best "$m" <<<"$ref")
  printf '%-10s %12s %12s %8.3f\n' "$m" "$o" "$r" "$(awk -v o="$o" -v r="$r" 'BEGIN{print o/r}')"
done
echo "(batch ${BENCH_BATCH:-8}, ${THREADS} threads, best of ${ROUNDS} alternating rounds; reference: timm swin_tiny_patch4_window7_224, torchvision resnet50)"
