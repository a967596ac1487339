#!/usr/bin/env bash
# CPU inference of ConvNeXt-T Cascade Mask R-CNN on one COCO image at test scale (1333, 800):
# cnx vs mmdetection 2.28 CascadeRCNN (PyTorch reference network), same random weights, same threads.
set -euo pipefail
cd "$(dirname "$0")/.."
export VIRTUAL_ENV=$PWD/.venv PATH=$PWD/.venv/bin:$PATH LIBTORCH_USE_PYTORCH=1
THREADS=${THREADS:-$(nproc)}
RUNS=${RUNS:-3}
DIR=${BENCH_DIR:-target/bench-cascade}
cargo build --release -q -p cnx-heads --example bench_cascade
[ -f "$DIR/weights.safetensors" ] || python bench/cascade.py prepare "$DIR"
read -r REF NREF < <(python bench/cascade.py ref "$DIR" "$THREADS" "$RUNS" 2>/dev/null | tail -1)
read -r OURS NOURS < <(target/release/examples/bench_cascade "$DIR" "$THREADS" "$RUNS" | tail -1)
printf "Cascade Mask R-CNN ConvNeXt-T, 1 image 800x1067 (test scale 1333x800), CPU, %s threads, median of %s\n" "$THREADS" "$RUNS"
printf "  mmdet 2.28 (PyTorch): %8.3f s  (%s detections)\n" "$REF" "$NREF"
printf "  cnx:                  %8.3f s  (%s detections)\n" "$OURS" "$NOURS"
python -c "print(f'  ratio cnx / mmdet:    {$OURS / $REF:8.3f}  (goal <= 1.0)')"
