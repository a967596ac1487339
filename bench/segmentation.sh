#!/usr/bin/env bash
# UperNet + ConvNeXt-T CPU inference of one 512x2048 image (eval, no grad), whole-image and
# sliding-window (crop 512, stride 341): ours (tch) vs mmsegmentation 0.30's EncoderDecoder on the
# same architecture, same thread count, alternating run by run (bench/segmentation.py); prints
# medians, minima and ours/reference (goal ≤ 1.0).
# Env: BENCH_RUNS (3), BENCH_WARMUP (1), BENCH_THREADS (all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
THREADS="${BENCH_THREADS:-$(nproc)}"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
cargo build --release -q -p cnx-heads --example bench_segmentation
.venv/bin/python bench/segmentation.py "${BENCH_RUNS:-3}" "${BENCH_WARMUP:-1}" "$@" 2> >(grep -v -i warn >&2)
