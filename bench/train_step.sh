#!/usr/bin/env bash
# One training step (forward + backward + AdamW, batch 2, random weights, synthetic inputs) of
# Mask R-CNN, Cascade Mask R-CNN (800x1067 padded to 800x1088) and UperNet (512x512) ConvNeXt-T
# on the CPU: `cnx benchmark PRESET --train` against mmdetection 2.28 / mmsegmentation 0.30 on
# the same architecture and shapes, same threads, alternating round by round
# (bench/mm_compare.py); prints the forward / backward / optimizer split and the ratios (goals:
# <= 0.75 detection, <= 0.9 UperNet).
# Args: the architectures (mask_rcnn, cascade, upernet; default all).
# Env: THREADS (all cores), ROUNDS (2), STEPS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
THREADS="${THREADS:-$(nproc)}"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
cargo build --release -q -p cnx
.venv/bin/python bench/mm_compare.py --train --cnx target/release/cnx --threads "$THREADS" \
  --rounds "${ROUNDS:-2}" --steps "${STEPS:-3}" "$@" 2> >(grep -v -i warn >&2)
