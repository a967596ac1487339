#!/usr/bin/env bash
# CPU inference of ConvNeXt-T Mask R-CNN and Cascade Mask R-CNN on one COCO image at test scale
# (1333, 800): cnx vs mmdetection 2.28 (PyTorch reference network), same random weights, same
# threads. Args: the architectures to run (mask_rcnn, cascade; default both).
# Env: THREADS (all cores), RUNS (3), BENCH_DIR (target; weights and input go to $BENCH_DIR/bench-<arch>).
set -euo pipefail
cd "$(dirname "$0")/.."
export VIRTUAL_ENV=$PWD/.venv PATH=$PWD/.venv/bin:$PATH LIBTORCH_USE_PYTORCH=1
THREADS=${THREADS:-$(nproc)}
RUNS=${RUNS:-3}
cargo build --release -q -p cnx-heads --example bench_detect
ARCHS=("$@")
[ $# -gt 0 ] || ARCHS=(mask_rcnn cascade)
for A in "${ARCHS[@]}"; do
  case $A in
    mask_rcnn) NAME="Mask R-CNN" ;;
    cascade) NAME="Cascade Mask R-CNN" ;;
    *) echo "unknown architecture $A (mask_rcnn | cascade)" >&2; exit 2 ;;
  esac
  DIR=${BENCH_DIR:-target}/bench-$A
  [ -f "$DIR/weights.safetensors" ] || python bench/detection.py prepare "$A" "$DIR"
  read -r REF NREF < <(python bench/detection.py ref "$A" "$DIR" "$THREADS" "$RUNS" 2>/dev/null | tail -1)
  read -r OURS NOURS < <(target/release/examples/bench_detect "$A" "$DIR" "$THREADS" "$RUNS" | tail -1)
  printf "%s ConvNeXt-T, 1 image 800x1067 (test scale 1333x800), CPU, %s threads, median of %s\n" "$NAME" "$THREADS" "$RUNS"
  printf "  mmdet 2.28 (PyTorch): %8.3f s  (%s detections)\n" "$REF" "$NREF"
  printf "  cnx:                  %8.3f s  (%s detections)\n" "$OURS" "$NOURS"
  python -c "print(f'  ratio cnx / mmdet:    {$OURS / $REF:8.3f}  (goal <= 1.0)')"
done
