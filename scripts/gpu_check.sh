#!/usr/bin/env bash
# GPU checks, prepared to run in one go on a machine with a CUDA device:
#   LD_LIBRARY_PATH=<torch>/lib bash scripts/gpu_check.sh
# with a prebuilt target/release/cnx (built against a CUDA libtorch). PyTorch comparisons run when
# $PY (default .venv/bin/python, else python3) imports torch and timm; otherwise they are skipped.
# Exit status: non-zero if any check FAILs. Each section prints its own PASS/FAIL lines; other
# components append their sections at the end (keep them short: the device time is limited).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/cnx}
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
WORK=${WORK:-$(mktemp -d /tmp/cnx-gpu-check.XXXXXX)}
FAILED=0
section() { echo; echo "=== $*"; }
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; FAILED=1; }
have_torch() { "$PY" -c "import torch, timm; assert torch.cuda.is_available()" >/dev/null 2>&1; }
# json_get FILE EXPR: evaluates a Python expression over the parsed JSON `j`.
json_get() { "$PY" -c "import json,sys; j=json.load(open(sys.argv[1])); print($2)" "$1"; }

[[ -x "$BIN" ]] || { echo "no $BIN: build it first (cargo build --release)"; exit 2; }

# ---------------------------------------------------------------------------------------------
section "doctor sees the GPU"
"$BIN" doctor
"$BIN" doctor --json > "$WORK/doctor.json" || fail "cnx doctor --json"
if [[ "$(json_get "$WORK/doctor.json" "j['cuda_available'] and len(j['devices']) > 0")" == "True" ]]; then
  pass "doctor: cuda available, $(json_get "$WORK/doctor.json" "j['devices']")"
else
  fail "doctor does not see a CUDA device (is libtorch_cuda loaded? LD_LIBRARY_PATH?)"
fi

# ---------------------------------------------------------------------------------------------
section "classify: --device cuda agrees with cpu (convnext_tiny, random weights)"
"$BIN" bench-forward --model convnext_tiny --save-weights "$WORK/tiny.safetensors" >/dev/null \
  || fail "writing a convnext_tiny checkpoint"
IMGS=(tests/fixtures/classify/synthetic.png)
for f in ../shared/data/coco-tiny/train2017/*.jpg; do [[ -f "$f" ]] && IMGS+=("$f"); [[ ${#IMGS[@]} -ge 4 ]] && break; done
for dev in cpu cuda; do
  "$BIN" classify --model convnext_tiny --weights "$WORK/tiny.safetensors" --topk 5 --json \
    --device "$dev" "${IMGS[@]}" > "$WORK/classify_$dev.json" || fail "classify --device $dev"
done
"$PY" - "$WORK/classify_cpu.json" "$WORK/classify_cuda.json" <<'PYEOF' && pass "classify cpu == cuda (top-1 equal, probs within 1e-3)" || fail "classify cpu vs cuda"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
assert len(a) == len(b) > 0
worst = 0.0
for x, y in zip(a, b):
    assert x["top"][0]["class"] == y["top"][0]["class"], (x, y)
    px = {t["class"]: t["prob"] for t in x["top"]}
    for t in y["top"]:
        if t["class"] in px:
            worst = max(worst, abs(px[t["class"]] - t["prob"]))
print(f"images {len(a)}, max prob difference {worst:.2e}")
assert worst < 1e-3
PYEOF

# ---------------------------------------------------------------------------------------------
section "convnext_tiny forward, batch 64, 224x224: cnx vs PyTorch on this GPU"
ITERS=${ITERS:-30}
common=(--model convnext_tiny --batch 64 --size 224 --iters "$ITERS" --warmup 5 --device cuda)
: > "$WORK/gpu_bench.jsonl"
for mode in "fp32" "bf16-cl"; do
  extra=(); [[ $mode == bf16-cl ]] && extra=(--bf16 --channels-last)
  "$BIN" bench-forward "${common[@]}" "${extra[@]}" >> "$WORK/gpu_bench.jsonl" || fail "cnx bench-forward $mode"
  if have_torch; then
    "$PY" bench/backbone.py "${common[@]}" "${extra[@]}" >> "$WORK/gpu_bench.jsonl" || fail "pytorch bench $mode"
  fi
done
have_torch || echo "(PyTorch with CUDA + timm not importable by $PY: PyTorch columns skipped)"
"$PY" - "$WORK/gpu_bench.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| mode | cnx ms | PyTorch ms | ratio | cnx img/s |")
print("|---|---|---|---|---|")
for mode in [(False, False), (True, True)]:
    r = {x["impl"]: x for x in rows if (x["bf16"], x["channels_last"]) == mode}
    if "cnx" not in r:
        continue
    o = r["cnx"]["median_ms"]; t = r.get("pytorch", {}).get("median_ms")
    name = "bf16 autocast, channels-last" if mode[0] else "fp32"
    ratio = f"{o / t:.3f}" if t else "-"
    tt = f"{t:.2f}" if t else "-"
    print(f"| {name} | {o:.2f} | {tt} | {ratio} | {64 / o * 1e3:.0f} |")
PYEOF

# ---------------------------------------------------------------------------------------------
# (sections from other components go below)

# ---------------------------------------------------------------------------------------------
section "training throughput: Mask R-CNN ConvNeXt-T 1333x800 and UperNet-T 512x512, AMP, 100 it"
# Synthetic data from `cnx demo --data-only`; the real presets at full resolution, 2 images per
# GPU as in the recipes; peak memory sampled with nvidia-smi (device total, includes the context).
train_bench() {  # name preset data_root extra-args...
  local name=$1 preset=$2 root=$3; shift 3
  local mem="$WORK/mem_$name.txt"; : > "$mem"
  ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1 >> "$mem"; sleep 0.5; done ) &
  local sampler=$!
  timeout 240 "$BIN" train "$preset" --device cuda --set data.root="$root" --set data.batch_size=2 \
    --set data.workers=8 --set runtime.log_interval=10 --set runtime.amp=fp16 --stop-at 100 --no-eval \
    --work-dir "$WORK/train_$name" "$@" > "$WORK/train_$name.out" 2>&1
  local rc=$?
  kill $sampler 2>/dev/null; wait $sampler 2>/dev/null
  if [[ $rc -ne 0 ]]; then fail "train $name (rc $rc): $(tail -3 "$WORK/train_$name.out")"; return; fi
  "$PY" - "$WORK/train_$name/log.jsonl" "$mem" "$name" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
late = [r for r in rows if r["iter"] > 20] or rows
it_s = sum(1.0 / r["time"] for r in late) / len(late)
img_s = sum(r["images_per_s"] for r in late) / len(late)
mem = [int(x) for x in open(sys.argv[2]) if x.strip().isdigit()]
print(f"PASS train {sys.argv[3]}: {it_s:.2f} it/s, {img_s:.1f} images/s (iters 21-100), "
      f"peak GPU memory {max(mem) if mem else 0} MiB, final loss {rows[-1]['loss']:.3f}")
PYEOF
}
"$BIN" demo det --data-only --images 200 --out "$WORK/synth_det" > /dev/null 2>&1 || fail "synthetic COCO data"
"$BIN" demo seg --data-only --images 200 --out "$WORK/synth_seg" > /dev/null 2>&1 || fail "synthetic ADE data"
train_bench maskrcnn_t mask_rcnn_convnext_tiny_3x "$WORK/synth_det/data" --set model.num_classes=6
train_bench upernet_t upernet_convnext_tiny_512_160k "$WORK/synth_seg/data" --set model.num_classes=8

# ---------------------------------------------------------------------------------------------
section "UperNet ConvNeXt-T inference, one 512x2048 image (whole): images/s fp32 and bf16"
: > "$WORK/seg_bench.jsonl"
for extra in "" "--bf16"; do
  # shellcheck disable=SC2086
  "$BIN" bench-seg --preset upernet_convnext_tiny_512_160k --input 512x2048 --mode whole \
    --iters "${SEG_ITERS:-20}" --warmup 3 --device cuda $extra >> "$WORK/seg_bench.jsonl" \
    || fail "cnx bench-seg ${extra:-fp32}"
done
"$PY" - "$WORK/seg_bench.jsonl" <<'PYEOF' && pass "UperNet inference timed" || fail "UperNet inference timing"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
assert len(rows) == 2, rows
print("| precision | ms / image | images/s |")
print("|---|---|---|")
for r in rows:
    print(f"| {'bf16 autocast' if r['bf16'] else 'fp32'} | {r['median_ms']:.1f} | {r['images_per_s']:.2f} |")
PYEOF

# ---------------------------------------------------------------------------------------------
section "Mask R-CNN ConvNeXt-T: predict on cuda agrees with cpu; fps at 1280x800 fp32 and bf16"
MR_W="$WORK/maskrcnn_w"
if "$PY" bench/detection.py prepare "$MR_W" > /dev/null 2>&1; then
  IMG=../shared/data/coco-tiny/train2017/000000008193.jpg
  "$BIN" predict --preset mask_rcnn_convnext_tiny_3x --weights "$MR_W/weights.safetensors" --device cuda \
    --out-dir "$WORK/pred_cuda" "$IMG" > /dev/null 2>&1 || fail "cnx predict --device cuda"
  "$BIN" predict --preset mask_rcnn_convnext_tiny_3x --weights "$MR_W/weights.safetensors" --device cpu \
    --out-dir "$WORK/pred_cpu" "$IMG" > /dev/null 2>&1 || fail "cnx predict --device cpu"
  "$PY" - "$WORK/pred_cuda/predictions.json" "$WORK/pred_cpu/predictions.json" <<'PYEOF' && pass "Mask R-CNN predict cuda == cpu" || fail "Mask R-CNN predict cuda vs cpu"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
print(f"cuda {len(a)} / cpu {len(b)} detections")
assert len(a) == len(b) and len(a) > 0
top = lambda r: sorted(r, key=lambda d: -d["score"])[:20]
for x, y in zip(top(a), top(b)):
    assert x["category_id"] == y["category_id"], (x["category_id"], y["category_id"])
    assert max(abs(p - q) for p, q in zip(x["bbox"], y["bbox"])) < 0.5, (x["bbox"], y["bbox"])
PYEOF
else
  fail "bench/detection.py prepare (mmdet reference install)"
fi
: > "$WORK/det_bench.jsonl"
for extra in "" "--bf16"; do
  # shellcheck disable=SC2086
  "$BIN" predict --preset mask_rcnn_convnext_tiny_3x --bench "${DET_ITERS:-20}" --input 1280x800 --device cuda $extra \
    >> "$WORK/det_bench.jsonl" || fail "cnx predict --bench ${extra:-fp32}"
done
"$PY" - "$WORK/det_bench.jsonl" <<'PYEOF' && pass "Mask R-CNN inference timed (paper: 25.6 FPS on A100, fp32)" || fail "Mask R-CNN inference timing"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
assert len(rows) == 2, rows
print("| precision | ms / image | images/s | detections |")
print("|---|---|---|---|")
for r in rows:
    print(f"| {'bf16 autocast' if r['bf16'] else 'fp32'} | {r['median_ms']:.1f} | {r['images_per_s']:.2f} | {r['detections']} |")
PYEOF

echo
if [[ $FAILED -ne 0 ]]; then echo "gpu_check: SOME CHECKS FAILED (details above; files in $WORK)"; exit 1; fi
echo "gpu_check: all checks passed (files in $WORK)"
