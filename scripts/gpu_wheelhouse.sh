#!/usr/bin/env bash
# The wheelhouse scripts/gpu_check.sh installs offline on the GPU machine (torch 2.11 and Python
# 3.12 there, no network) to run mmdetection 2.28 / mmsegmentation 0.30 beside cnx: mmcv's
# pure-Python build (MMCV_WITH_OPS=0: RoIAlign and NMS come from tools/reference/mmcv_ext_shim.py
# over torchvision.ops), mmdet, mmseg, torchvision (built for the same torch) and their small
# pure-Python dependencies, plus numpy, pycocotools, PyYAML and Pillow for CPython 3.12. OpenCV,
# matplotlib and SciPy (imported by mmcv / mmdet but never called by the comparison) are replaced
# by tools/reference/import_stubs/. Checked by installing these wheels (their Python 3.11
# builds for the compiled ones) into an empty venv beside torch and running bench/mm_compare.py. Run here, with network:
#
#   bash scripts/gpu_wheelhouse.sh            # -> target/gpu-wheelhouse (about 30 MiB)
#
# then carry target/gpu-wheelhouse with target/release/cnx to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/gpu-wheelhouse}
PY=${PY:-.venv/bin/python}
TORCH=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
[[ $TORCH == 2.11.* ]] || { echo "torch $TORCH in $PY; the GPU machines run 2.11" >&2; exit 2; }
rm -rf "$OUT"; mkdir -p "$OUT"
PIP=("$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64
  --platform manylinux_2_17_x86_64 -d "$OUT")
"${PIP[@]}" mmdet==2.28.2 mmsegmentation==0.30.0 torchvision==0.26.0 \
  addict yapf platformdirs tomli terminaltables prettytable wcwidth packaging six pyyaml pillow \
  numpy pycocotools
# mmcv 1.7.2 is an sdist: build its pure-Python wheel here (no compiled ops).
MMCV_WITH_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$OUT" mmcv==1.7.2
ls -la "$OUT"
du -sh "$OUT"
