#!/usr/bin/env bash
# GPU checks, prepared to run in one go (well under 8 minutes on one H200) on a machine with a
# CUDA device, no cargo and no network, with the target/release/cnx built elsewhere:
#
#   bash scripts/gpu_check.sh                    # every section
#   bash scripts/gpu_check.sh doctor classify    # only these (names: see SECTIONS below)
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh    # dry run on the CPU (part of `make test`)
#
# The binary's rpath points at the build machine's torch/lib, so the script finds this machine's
# own PyTorch (`$PY`, default .venv/bin/python when it imports torch, else python3) and puts its
# lib dir first on LD_LIBRARY_PATH; it says so plainly when the binary cannot load libtorch_cuda.
# Everything runs on data and weights the project makes itself (`cnx demo ... --data-only`,
# random or freshly trained weights); nothing is read from outside the repository. Sections that
# need Python packages this machine lacks (timm for the PyTorch speed columns) say SKIP with the
# reason instead of failing.
#
# Dry run (GPU_CHECK_DRY=1): every section with --device cpu, tiny inputs and one or two
# iterations, so the argument handling, data paths and output parsing cannot rot between GPU
# visits; what only CUDA can do is reported as SKIP. Work files are removed at the end then
# (KEEP=1 keeps them). Env: PY, BIN, WORK, BUDGET (seconds after which no section starts, 450).
#
# Output: PASS / FAIL / SKIP lines per check; exit status 1 if any FAIL, 2 on bad usage.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/cnx}
DRY=${GPU_CHECK_DRY:-0}
[[ $DRY == 0 ]] && DRY=""
SECTIONS=(doctor classify backbone train dist seg_infer det_eval det_predict det_bench mm)

usage() { echo "usage: [GPU_CHECK_DRY=1] $0 [${SECTIONS[*]}]"; }
SEL=()
for a in "$@"; do
  case " ${SECTIONS[*]} " in
    *" $a "*) SEL+=("$a") ;;
    *) echo "unknown section '$a'"; usage; exit 2 ;;
  esac
done
# Sections start only while the time budget lasts (a command on the GPU machine is cut at 10
# minutes; what ran is still reported).
BUDGET=${BUDGET:-450}
want() {
  [[ ${#SEL[@]} -eq 0 || " ${SEL[*]} " == *" $1 "* ]] || return 1
  if (( SECONDS - T0 > BUDGET )); then
    echo; skip "section $1: past the time budget (${BUDGET} s)"; return 1
  fi
}

FAILED=0
T_SEC=""
took() { [[ -n $T_SEC ]] && echo "    (section: $(( SECONDS - T_SEC )) s)"; T_SEC=$SECONDS; }
section() { took; echo; echo "=== $*"; }
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; FAILED=1; }
skip() { echo "SKIP $*"; }
T0=$SECONDS

[[ -x "$BIN" ]] || { echo "no $BIN: build it first (cargo build --release) and copy it here"; exit 2; }

# --- Python and this machine's libtorch -------------------------------------------------------
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    PY=.venv/bin/python
  else
    PY=python3
  fi
fi
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "no Python ($PY): it is needed to find libtorch and to read the outputs"; exit 2
fi
TORCH_DIR=$("$PY" -c 'import torch, os; print(os.path.dirname(torch.__file__))' 2>/dev/null)
TORCH_VER=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)
if [[ -n "$TORCH_DIR" && -d "$TORCH_DIR/lib" ]]; then
  export LD_LIBRARY_PATH="$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "libtorch: $TORCH_DIR/lib (torch $TORCH_VER, via $PY)"
else
  echo "warning: $PY cannot import torch: the binary must find libtorch through its rpath or LD_LIBRARY_PATH"
fi

if [[ -n "${WORK:-}" ]]; then
  mkdir -p "$WORK"
else
  WORK=$(mktemp -d /tmp/cnx-gpu-check.XXXXXX)
  [[ -n $DRY && -z "${KEEP:-}" ]] && trap 'rm -rf "$WORK"' EXIT
fi

# Output checks run through this guard: a missing or malformed file is one "error:" line and a
# non-zero status (then a FAIL line), never a traceback.
cat > "$WORK/guard.py" <<'PYEOF'
import sys
code = sys.stdin.read()
try:
    exec(compile(code, "<check>", "exec"), {"__name__": "__main__"})
except SystemExit:
    raise
except BaseException as e:  # noqa: BLE001 - one line instead of a traceback
    print(f"  error: {type(e).__name__}: {e}")
    sys.exit(1)
PYEOF
py() { "$PY" "$WORK/guard.py" "$@"; }
# Why a command failed: its anyhow "Error:" line (and causes), else its last lines.
export RUST_LIB_BACKTRACE=${RUST_LIB_BACKTRACE:-0}
why() {
  local e
  e=$(grep -A4 -m1 '^Error' "$1" 2>/dev/null | grep -v '^\s*$' | grep -v '^Stack backtrace' | head -4 | tr '\n' ' ')
  [[ -n $e ]] && echo "$e" || tail -2 "$1" 2>/dev/null | tr '\n' ' '
}
has_file() { [[ -s "$1" ]] || { fail "$2: $1 missing or empty"; return 1; }; }

if [[ -n $DRY ]]; then
  DEV=cpu
  echo "dry run: --device cpu, tiny inputs, 1-2 iterations; CUDA-only checks are skipped"
else
  DEV=cuda
fi

# Synthetic datasets the project makes itself (made once, on first use).
SYN_DET="$WORK/synth_det/data"
SYN_SEG="$WORK/synth_seg/data"
NIMG=${NIMG:-200}; [[ -n $DRY ]] && NIMG=10
det_data() {
  [[ -f "$SYN_DET/annotations/instances_train.json" ]] && return 0
  timeout 120 "$BIN" demo det --data-only --images "$NIMG" --out "$WORK/synth_det" > "$WORK/synth_det.out" 2>&1 \
    && [[ -f "$SYN_DET/annotations/instances_train.json" ]] \
    || { fail "synthetic COCO data: $(why "$WORK/synth_det.out")"; return 1; }
}
seg_data() {
  [[ -d "$SYN_SEG/annotations/training" ]] && return 0
  timeout 120 "$BIN" demo seg --data-only --images "$NIMG" --out "$WORK/synth_seg" > "$WORK/synth_seg.out" 2>&1 \
    && [[ -d "$SYN_SEG/annotations/training" ]] \
    || { fail "synthetic ADE data: $(why "$WORK/synth_seg.out")"; return 1; }
}
# `cnx demo det --data-only` writes annotations/instances_{train,val}.json with train/ and val/;
# the COCO presets expect *2017 names, so the paths are passed.
DET_SETS=(--set data.root="$SYN_DET"
  --set data.train_ann=annotations/instances_train.json --set data.train_images=train
  --set data.val_ann=annotations/instances_val.json --set data.val_images=val
  --set model.roi.num_classes=6 --set data.batch_size=2 --set runtime.checkpoint_interval=0)
SEG_SETS=(--set data.root="$SYN_SEG" --set model.num_classes=8 --set data.batch_size=2
  --set runtime.checkpoint_interval=0)
if [[ -n $DRY ]]; then
  DET_SETS+=(--set "data.img_scale=[224,128]" --set data.workers=1)
  SEG_SETS+=(--set "data.img_scale=[128,64]" --set "data.crop_size=[64,64]" --set data.workers=1)
else
  DET_SETS+=(--set data.workers=8)
  SEG_SETS+=(--set data.workers=8)
fi

# ---------------------------------------------------------------------------------------------
if want doctor; then
section "doctor: the binary loads libtorch (with CUDA) and sees the GPU"
ldd_out=$(ldd "$BIN" 2>&1)
if grep -q "libtorch_cuda.so => not found" <<<"$ldd_out"; then
  fail "the binary cannot load libtorch_cuda.so (not found; LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"
elif ! grep -q "libtorch_cuda" <<<"$ldd_out"; then
  if [[ -n $DRY ]]; then skip "binary links no libtorch_cuda (built against a CPU-only libtorch)"
  else fail "the binary links no libtorch_cuda: it was built against a CPU-only libtorch"; fi
elif grep -q "not found" <<<"$ldd_out"; then
  fail "libraries the binary cannot load: $(grep 'not found' <<<"$ldd_out" | awk '{print $1}' | tr '\n' ' ')"
else
  pass "ldd: libtorch_cuda => $(grep libtorch_cuda <<<"$ldd_out" | awk '{print $3}')"
fi
if ! "$BIN" doctor --json > "$WORK/doctor.json" 2> "$WORK/doctor.err"; then
  fail "cnx doctor does not run: $(head -3 "$WORK/doctor.err")"
  echo "(the binary cannot start here: nothing else can run)"; exit 1
fi
"$BIN" doctor
if has_file "$WORK/doctor.json" "cnx doctor --json"; then
  py "$WORK/doctor.json" "$TORCH_VER" <<'PYEOF' && pass "doctor: libtorch version matches this machine's torch" || fail "doctor: the binary's libtorch and this machine's torch differ (ABI)"
import json, sys
j = json.load(open(sys.argv[1]))
mine, here = j["torch"], sys.argv[2].split("+")[0]
print(f"  binary built with torch {j['torch_build']}, this machine has {sys.argv[2] or 'none'}")
assert not here or mine.split(".")[:2] == here.split(".")[:2]
PYEOF
  if [[ -n $DRY ]]; then
    skip "doctor sees a CUDA device (dry run)"
  else
    py "$WORK/doctor.json" <<'PYEOF' && pass "doctor: CUDA available" || fail "doctor does not see a CUDA device (driver? libtorch_cuda loaded? see ldd above)"
import json, sys
j = json.load(open(sys.argv[1]))
print(f"  devices: {j['devices']}, cudnn {j['cudnn_available']}")
assert j["cuda_available"] and len(j["devices"]) > 0, "libtorch reports no CUDA device"
PYEOF
  fi
fi
fi

# ---------------------------------------------------------------------------------------------
if want classify; then
section "classify: --device $DEV agrees with cpu (convnext_tiny, random weights)"
if "$BIN" bench-forward --model convnext_tiny --device cpu --save-weights "$WORK/tiny.safetensors" > /dev/null 2>&1; then
  IMGS=(tests/fixtures/classify/synthetic.png)
  if det_data; then
    for f in "$SYN_DET"/val/*.jpg; do [[ -f "$f" ]] && IMGS+=("$f"); [[ ${#IMGS[@]} -ge 4 ]] && break; done
  fi
  ok=1
  for dev in cpu "$DEV"; do
    timeout 120 "$BIN" classify --model convnext_tiny --weights "$WORK/tiny.safetensors" --topk 5 --json \
      --device "$dev" "${IMGS[@]}" > "$WORK/classify_$dev.json" 2> "$WORK/classify_$dev.err" \
      || { fail "classify --device $dev: $(why "$WORK/classify_$dev.err")"; ok=0; }
  done
  if [[ $ok == 1 ]] && has_file "$WORK/classify_$DEV.json" "classify output"; then
    py "$WORK/classify_cpu.json" "$WORK/classify_$DEV.json" <<'PYEOF' && pass "classify cpu == $DEV (top-1 equal, probs within 1e-3)" || fail "classify cpu vs $DEV"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
assert len(a) == len(b) > 0, (len(a), len(b))
worst = 0.0
for x, y in zip(a, b):
    assert x["top"][0]["class"] == y["top"][0]["class"], (x, y)
    px = {t["class"]: t["prob"] for t in x["top"]}
    for t in y["top"]:
        if t["class"] in px:
            worst = max(worst, abs(px[t["class"]] - t["prob"]))
print(f"  images {len(a)}, max prob difference {worst:.2e}")
assert worst < 1e-3
PYEOF
  fi
else
  fail "writing a convnext_tiny checkpoint (bench-forward --save-weights)"
fi
# The parser: a CUDA device that is not there is an error, never a silent CPU run.
if "$BIN" classify --model convnext_tiny --weights "$WORK/tiny.safetensors" --device cuda:99 \
    tests/fixtures/classify/synthetic.png > /dev/null 2> "$WORK/nocuda.err"; then
  fail "--device cuda:99 ran although libtorch sees no such device"
elif grep -q "cuda:99" "$WORK/nocuda.err"; then
  pass "--device cuda:99 is refused: $(grep -m1 cuda:99 "$WORK/nocuda.err" | cut -c1-120)"
else
  fail "--device cuda:99: unclear error: $(tail -1 "$WORK/nocuda.err")"
fi
fi

# ---------------------------------------------------------------------------------------------
if want backbone; then
section "convnext_tiny forward: cnx vs PyTorch on $DEV (fp32; bf16 autocast + channels-last)"
if [[ -n $DRY ]]; then
  common=(--model convnext_tiny --batch 2 --size 64 --iters 1 --warmup 0 --device cpu)
else
  common=(--model convnext_tiny --batch 64 --size 224 --iters "${ITERS:-30}" --warmup 5 --device cuda)
fi
have_ref=0
if "$PY" -c "import torch, timm; assert '$DEV' == 'cpu' or torch.cuda.is_available()" >/dev/null 2>&1; then
  have_ref=1
else
  skip "PyTorch columns: $PY lacks timm or a CUDA torch"
fi
: > "$WORK/gpu_bench.jsonl"
for mode in fp32 bf16-cl; do
  extra=(); [[ $mode == bf16-cl ]] && extra=(--bf16 --channels-last)
  timeout 120 "$BIN" bench-forward "${common[@]}" "${extra[@]}" >> "$WORK/gpu_bench.jsonl" 2> "$WORK/bench_$mode.err" \
    || fail "cnx bench-forward $mode: $(why "$WORK/bench_$mode.err")"
  if [[ $have_ref == 1 ]]; then
    timeout 120 "$PY" bench/backbone.py "${common[@]}" "${extra[@]}" >> "$WORK/gpu_bench.jsonl" 2> "$WORK/ref_$mode.err" \
      || fail "PyTorch bench $mode: $(why "$WORK/ref_$mode.err")"
  fi
done
if has_file "$WORK/gpu_bench.jsonl" "backbone timings"; then
  py "$WORK/gpu_bench.jsonl" "$(( common[3] ))" <<'PYEOF' && pass "backbone forward timed" || fail "backbone timing table"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
batch = int(sys.argv[2])
print("| mode | cnx ms | PyTorch ms | ratio | cnx img/s |")
print("|---|---|---|---|---|")
n = 0
for mode in [(False, False), (True, True)]:
    r = {x["impl"]: x for x in rows if (x["bf16"], x["channels_last"]) == mode}
    if "cnx" not in r:
        continue
    n += 1
    o = r["cnx"]["median_ms"]; t = r.get("pytorch", {}).get("median_ms")
    name = "bf16 autocast, channels-last" if mode[0] else "fp32"
    ratio = f"{o / t:.3f}" if t else "-"
    tt = f"{t:.2f}" if t else "-"
    print(f"| {name} | {o:.2f} | {tt} | {ratio} | {batch / o * 1e3:.0f} |")
assert n == 2, "a mode is missing"
PYEOF
fi
fi

# ---------------------------------------------------------------------------------------------
# Throughput of the real presets (2 images per GPU as in the recipes) on synthetic data, fp16
# AMP (dynamic loss scaling), 100 iterations; peak memory sampled with nvidia-smi (device total,
# includes the context). The Mask R-CNN run's checkpoint is reused by det_eval / det_predict.
STOP=100; [[ -n $DRY ]] && STOP=1
train_bench() {  # name preset timeout sets...
  local name=$1 preset=$2 limit=$3; shift 3
  local mem="$WORK/mem_$name.txt"; : > "$mem"
  local sampler=""
  if [[ -z $DRY ]] && command -v nvidia-smi >/dev/null; then
    ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1 >> "$mem"; sleep 0.5; done ) &
    sampler=$!
  fi
  rm -rf "$WORK/train_$name"
  timeout "$limit" "$BIN" train "$preset" --device "$DEV" "$@" --set runtime.log_interval=10 \
    --set runtime.amp=fp16 --stop-at "$STOP" --no-eval --work-dir "$WORK/train_$name" > "$WORK/train_$name.out" 2>&1
  local rc=$?
  if [[ -n $sampler ]]; then kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null; fi
  if [[ $rc -ne 0 ]]; then fail "train $name (rc $rc): $(why "$WORK/train_$name.out")"; return 1; fi
  if grep -qi "deprecat" "$WORK/train_$name.out"; then
    fail "train $name: deprecation warnings in the output: $(grep -i -m1 deprecat "$WORK/train_$name.out" | cut -c1-150)"
  fi
  has_file "$WORK/train_$name/log.jsonl" "train $name log" || return 1
  py "$WORK/train_$name/log.jsonl" "$mem" "$name" "$STOP" <<'PYEOF' || fail "train $name: log"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in rows if r.get("mode") == "train"]
assert rows, "no training lines in the log"
stop = int(sys.argv[4])
assert rows[-1]["iter"] == stop, f"log ends at iteration {rows[-1]['iter']}, not {stop}"
late = [r for r in rows if r["iter"] > 20] or rows
it_s = sum(1.0 / r["time"] for r in late) / len(late)
img_s = sum(r["images_per_s"] for r in late) / len(late)
mem = [int(x) for x in open(sys.argv[2]) if x.strip().isdigit()]
skipped = sum(r.get("skipped_steps", 0) for r in rows)
loss = rows[-1].get("loss")
scale = rows[-1].get("loss_scale", "-")
print(f"PASS train {sys.argv[3]} on {rows[-1].get('device', '?')}: {it_s:.2f} it/s, {img_s:.1f} images/s "
      f"(iters {late[0]['iter']}-{stop}), peak GPU memory {max(mem) if mem else '-'} MiB, "
      f"final loss {loss if loss is None else f'{loss:.3f}'}, loss scale {scale}, {skipped:.0f} skipped steps")
PYEOF
}
if want train; then
section "training throughput: Mask R-CNN ConvNeXt-T and UperNet ConvNeXt-T, fp16 AMP, $STOP it"
[[ -n $DRY ]] && skip "fp16 autocast and memory sampling (CUDA only): runtime.amp=fp16 runs in fp32 on the CPU"
if det_data; then
  train_bench maskrcnn_t mask_rcnn_convnext_tiny_3x 200 "${DET_SETS[@]}"
fi
if seg_data; then
  train_bench upernet_t upernet_convnext_tiny_512_160k 150 "${SEG_SETS[@]}"
fi
fi

# ---------------------------------------------------------------------------------------------
# Data parallel as PyTorch users launch it: torchrun starts one rank (NCCL on the GPU, Gloo in
# the dry run) through the agent's store; 20 iterations of the Mask R-CNN preset, throughput next
# to the single-process run of the train section.
if want dist; then
DSTOP=20; [[ -n $DRY ]] && DSTOP=1
section "torchrun --nproc-per-node 1 --no-python cnx train (NCCL; Gloo in the dry run), $DSTOP it"
if det_data; then
  BACKEND=nccl; [[ -n $DRY ]] && BACKEND=gloo
  rm -rf "$WORK/train_dist"
  timeout 300 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 --no-python \
    "$BIN" train mask_rcnn_convnext_tiny_3x --device "$DEV" "${DET_SETS[@]}" \
    --set runtime.log_interval=10 --set runtime.amp=fp16 --stop-at "$DSTOP" --no-eval \
    --dist-backend "$BACKEND" --work-dir "$WORK/train_dist" > "$WORK/train_dist.out" 2>&1
  rc=$?
  if [[ $rc -ne 0 ]]; then
    fail "torchrun train (rc $rc): $(why "$WORK/train_dist.out")"
  elif ! grep -q "data parallel: 1 ranks ($BACKEND)" "$WORK/train_dist.out"; then
    fail "torchrun train: no '$BACKEND' process group in the output"
  elif has_file "$WORK/train_dist/log.jsonl" "torchrun train log"; then
    py "$WORK/train_dist/log.jsonl" "$WORK/train_maskrcnn_t/log.jsonl" "$BACKEND" <<'PYEOF' || fail "torchrun train: log"
import json, os, sys
def rows(p):
    if not os.path.exists(p):
        return []
    return [r for r in (json.loads(l) for l in open(p) if l.strip()) if r.get("mode") == "train"]
d = rows(sys.argv[1]); s = rows(sys.argv[2])
assert d, "no training lines in the torchrun run's log"
img = d[-1]["images_per_s"]
ref = s[-1]["images_per_s"] if s else None
ratio = f", {img / ref:.3f}x the single-process run ({ref:.1f} images/s)" if ref else ""
print(f"PASS torchrun 1 rank ({sys.argv[3]}): {img:.1f} images/s at iteration {d[-1]['iter']}{ratio}")
PYEOF
  fi
fi
fi

# ---------------------------------------------------------------------------------------------
if want seg_infer; then
section "UperNet ConvNeXt-T inference, one image (whole): images/s fp32 and bf16"
SEG_IN=512x2048; SEG_IT=${SEG_ITERS:-20}; SEG_WU=3
[[ -n $DRY ]] && { SEG_IN=64x128; SEG_IT=1; SEG_WU=0; }
: > "$WORK/seg_bench.jsonl"
for extra in "" "--bf16"; do
  # shellcheck disable=SC2086
  timeout 120 "$BIN" bench-seg --preset upernet_convnext_tiny_512_160k --input "$SEG_IN" --mode whole \
    --iters "$SEG_IT" --warmup "$SEG_WU" --device "$DEV" $extra >> "$WORK/seg_bench.jsonl" 2> "$WORK/seg_bench.err" \
    || fail "cnx bench-seg ${extra:-fp32}: $(why "$WORK/seg_bench.err")"
done
if has_file "$WORK/seg_bench.jsonl" "bench-seg output"; then
  py "$WORK/seg_bench.jsonl" <<'PYEOF' && pass "UperNet inference timed" || fail "UperNet inference timing"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
assert len(rows) == 2, f"{len(rows)} rows"
print("| precision | ms / image | images/s | device |")
print("|---|---|---|---|")
for r in rows:
    print(f"| {'bf16 autocast' if r['bf16'] else 'fp32'} | {r['median_ms']:.1f} | {r['images_per_s']:.2f} | {r['device']} |")
PYEOF
fi
fi

# ---------------------------------------------------------------------------------------------
# A Mask R-CNN checkpoint the project makes itself: the train section's, else a short run now.
det_checkpoint() {
  local tw="$WORK/train_maskrcnn_t"
  if [[ ! -f "$tw/latest.json" ]]; then
    det_data || return 1
    local it=10; [[ -n $DRY ]] && it=1
    timeout 150 "$BIN" train mask_rcnn_convnext_tiny_3x --device "$DEV" "${DET_SETS[@]}" --stop-at "$it" \
      --no-eval --work-dir "$tw" > "$WORK/train_ckpt.out" 2>&1 \
      || { fail "training a Mask R-CNN checkpoint: $(why "$WORK/train_ckpt.out")"; return 1; }
  fi
  has_file "$tw/latest.json" "Mask R-CNN checkpoint" || return 1
  CKPT_ITER=$(py "$tw/latest.json" <<'PYEOF'
import json, sys
print(json.load(open(sys.argv[1]))["iter"])
PYEOF
) || { fail "reading $tw/latest.json"; return 1; }
  CKPT_DIR=$tw
  CKPT_WEIGHTS=$(printf "%s/iter_%07d.safetensors" "$tw" "$CKPT_ITER")
}

if want det_eval; then
section "Mask R-CNN ConvNeXt-T evaluation on $DEV agrees with cpu (own checkpoint, held-out synthetic images)"
if det_checkpoint; then
  # `--resume auto --stop-at <its iteration>`: no training step, no new checkpoint; the final
  # evaluation writes eval/iter_N/results.json (fp32 on both devices).
  ok=1
  NVAL=4; [[ -n $DRY ]] && NVAL=1
  for dev in "$DEV" cpu; do
    timeout 150 "$BIN" train mask_rcnn_convnext_tiny_3x --device "$dev" "${DET_SETS[@]}" --set data.val_max_images=$NVAL \
      --resume auto --stop-at "$CKPT_ITER" --work-dir "$CKPT_DIR" > "$WORK/det_eval_$dev.out" 2>&1 \
      || { fail "evaluation on $dev: $(why "$WORK/det_eval_$dev.out")"; ok=0; continue; }
    res=$(printf "%s/eval/iter_%07d/results.json" "$CKPT_DIR" "$CKPT_ITER")
    has_file "$res" "results of the evaluation on $dev" && cp "$res" "$WORK/det_eval_$dev.json" || ok=0
  done
  if [[ $ok == 1 ]]; then
    py "$WORK/det_eval_cpu.json" "$WORK/det_eval_$DEV.json" <<'PYEOF' && pass "Mask R-CNN cpu ~ $DEV (best detections matched by class, IoU >= 0.9, score within 0.02)" || fail "Mask R-CNN cpu vs $DEV detections"
import json, sys
from collections import defaultdict
a, b = (json.load(open(p)) for p in sys.argv[1:3])
print(f"  cpu {len(a)} / other {len(b)} detections")
assert len(a) > 0, "no detections to compare"
def iou(p, q):
    ax, ay, aw, ah = p; bx, by, bw, bh = q
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx)); ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    u = aw * ah + bw * bh - iw * ih
    return iw * ih / u if u > 0 else 0.0
by_img = defaultdict(list)
for d in b:
    by_img[d["image_id"]].append(d)
# The 20 best of each image (a barely trained model scores many boxes alike: order may differ).
per = defaultdict(list)
for d in sorted(a, key=lambda d: -d["score"]):
    if len(per[d["image_id"]]) < 20:
        per[d["image_id"]].append(d)
n = hit = 0
for img, ds in per.items():
    for d in ds:
        n += 1
        hit += any(e["category_id"] == d["category_id"] and abs(e["score"] - d["score"]) <= 0.02
                   and iou(e["bbox"], d["bbox"]) >= 0.9 for e in by_img[img])
print(f"  {hit}/{n} of the best cpu detections have a match")
# A barely trained model scores many proposals alike, so TF32 convolutions on the GPU can reorder
# near-ties; a device bug (wrong boxes, classes or scores) matches next to nothing.
assert hit >= 0.5 * n, "fewer than half match"
PYEOF
  fi
fi
fi

if want det_predict; then
section "cnx predict --bf16 on $DEV (own checkpoint, class layers dropped): runs and writes predictions.json"
if det_checkpoint && det_data; then
  PIMGS=("$SYN_DET"/val/*.jpg)
  NP=2; [[ -n $DRY ]] && NP=1
  timeout 150 "$BIN" predict --preset mask_rcnn_convnext_tiny_3x --weights "$CKPT_WEIGHTS" --drop-class-layers \
    --bf16 --device "$DEV" --out-dir "$WORK/pred_bf16" "${PIMGS[@]:0:$NP}" > "$WORK/pred_bf16.out" 2>&1 \
    || fail "cnx predict --bf16: $(why "$WORK/pred_bf16.out")"
  if has_file "$WORK/pred_bf16/predictions.json" "predict --bf16 output"; then
    py "$WORK/pred_bf16/predictions.json" <<'PYEOF' && pass "predict --bf16 wrote COCO results" || fail "predict --bf16 results"
import json, sys
r = json.load(open(sys.argv[1]))
assert isinstance(r, list)
assert all(len(d["bbox"]) == 4 and d["score"] == d["score"] for d in r)
print(f"  {len(r)} detections")
PYEOF
  fi
fi
fi

# ---------------------------------------------------------------------------------------------
if want det_bench; then
section "Mask R-CNN ConvNeXt-T inference at 1280x800 (random weights, every RoI kept): fp32 and bf16"
DET_IN=1280x800; DET_IT=${DET_ITERS:-20}
[[ -n $DRY ]] && { DET_IN=128x96; DET_IT=1; }
: > "$WORK/det_bench.jsonl"
for extra in "" "--bf16"; do
  # shellcheck disable=SC2086
  timeout 150 "$BIN" predict --preset mask_rcnn_convnext_tiny_3x --bench "$DET_IT" --input "$DET_IN" --device "$DEV" $extra \
    >> "$WORK/det_bench.jsonl" 2> "$WORK/det_bench.err" || fail "cnx predict --bench ${extra:-fp32}: $(why "$WORK/det_bench.err")"
done
if has_file "$WORK/det_bench.jsonl" "predict --bench output"; then
  py "$WORK/det_bench.jsonl" <<'PYEOF' && pass "Mask R-CNN inference timed (paper: 25.6 FPS on A100, fp32)" || fail "Mask R-CNN inference timing"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
assert len(rows) == 2, f"{len(rows)} rows"
print("| precision | ms / image | images/s | detections | device |")
print("|---|---|---|---|---|")
for r in rows:
    print(f"| {'bf16 autocast' if r['bf16'] else 'fp32'} | {r['median_ms']:.1f} | {r['images_per_s']:.2f} | {r['detections']} | {r['device']} |")
PYEOF
fi
fi

# ---------------------------------------------------------------------------------------------
# cnx beside mmdetection 2.28 / mmsegmentation 0.30 on this device (bench/mm_compare.py): the
# same networks, shapes and random-weight synthetic inputs, alternating round by round.
# Inference of Mask R-CNN T and Cascade T at 1280x800 (the paper's FPS setting: 25.6 and 13.5 on
# an A100), fp16 AMP training of Mask R-CNN T and UperNet T (batch 2 per GPU as the recipes),
# peak memory of both sides. The GPU machine has no network: when mmdet/mmseg are not
# importable, the wheelhouse made by scripts/gpu_wheelhouse.sh (carried as
# target/gpu-wheelhouse, or $WHEELHOUSE) is installed offline into the work dir first.
if want mm; then
section "cnx vs mmdet/mmseg on $DEV: inference 1280x800 (Mask R-CNN T, Cascade T), fp16 AMP training (Mask R-CNN T, UperNet T)"
WHEELHOUSE=${WHEELHOUSE:-target/gpu-wheelhouse}
mm_ok=0
if "$PY" -c "import mmdet, mmseg, mmcv, torchvision" >/dev/null 2>&1; then
  mm_ok=1
elif compgen -G "$WHEELHOUSE/*.whl" > /dev/null; then
  if timeout 120 "$PY" -m pip install --no-index --no-deps --target "$WORK/mmpkgs" "$WHEELHOUSE"/*.whl > "$WORK/mm_install.out" 2>&1; then
    export PYTHONPATH="$WORK/mmpkgs${PYTHONPATH:+:$PYTHONPATH}"
    if "$PY" -c "import mmdet, mmseg, mmcv, torchvision" > "$WORK/mm_import.out" 2>&1; then
      mm_ok=1
      pass "mmdet/mmseg installed offline from $WHEELHOUSE"
    else
      fail "mmdet/mmseg from $WHEELHOUSE do not import: $(tail -1 "$WORK/mm_import.out")"
    fi
  else
    fail "offline install from $WHEELHOUSE: $(tail -2 "$WORK/mm_install.out" | tr '\n' ' ')"
  fi
else
  skip "mmdet/mmseg not importable by $PY and no wheelhouse at $WHEELHOUSE (bash scripts/gpu_wheelhouse.sh makes it)"
fi
if [[ $mm_ok == 1 ]]; then
  if [[ -n $DRY ]]; then
    export CNX_IMPORT_STUBS=1  # OpenCV / matplotlib stubs first: they must never be called
    MM_INF=(--input 64x96 --rounds 1 --steps 1 --warmup 1); MM_TR=(--input 64x96 --rounds 1 --steps 1 --warmup 1)
    MM_SEG=(--input 64x64 --rounds 1 --steps 1 --warmup 1); MM_AMP=fp32
  else
    MM_INF=(--input 800x1280 --rounds 1 --steps 20 --warmup 5); MM_TR=(--rounds 1 --steps 10 --warmup 3)
    MM_SEG=(--rounds 1 --steps 10 --warmup 3); MM_AMP=fp16
  fi
  : > "$WORK/mm.jsonl"
  mm() {  # what args...
    local what=$1; shift
    if timeout 240 "$PY" bench/mm_compare.py --cnx "$BIN" --device "$DEV" --json "$WORK/mm.jsonl" "$@" \
      > "$WORK/mm_$what.out" 2>&1; then
      sed -n '/^==/,$p' "$WORK/mm_$what.out" | grep -v -i warn || true
    else
      fail "mm_compare $what: $(grep -v -i warn "$WORK/mm_$what.out" | tail -2 | tr '\n' ' ')"
    fi
  }
  mm infer --batch 1 "${MM_INF[@]}" mask_rcnn cascade
  mm train_det --train --batch 2 --amp "$MM_AMP" "${MM_TR[@]}" mask_rcnn
  mm train_seg --train --batch 2 --amp "$MM_AMP" "${MM_SEG[@]}" upernet
  if has_file "$WORK/mm.jsonl" "mm_compare results"; then
    py "$WORK/mm.jsonl" <<'PYEOF' && pass "cnx vs mmdet/mmseg table" || fail "cnx vs mmdet/mmseg table"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
assert len(rows) == 4, f"{len(rows)} of 4 comparisons"
paper = {"mask_rcnn": 25.6, "cascade": 13.5}
print("| model | what | cnx images/s | reference images/s | ratio cnx/ref time | cnx peak MB (alloc, reserved) | ref peak MB | paper FPS (A100) |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    what = ("train " if r["train"] else "inference ") + r["amp"]
    pk = lambda p: "-" if not p or p[0] is None else f"{p[0]:.0f}, {p[1]:.0f}" if p[1] is not None else f"{p[0]:.0f}"
    fps = paper.get(r["arch"], "-") if not r["train"] else "-"
    print(f"| {r['preset']} | {what} | {r['cnx_images_per_s']:.2f} | {r['ref_images_per_s']:.2f} | {r['ratio']:.3f} "
          f"| {pk(r['cnx_peak_mb'])} | {pk(r['ref_peak_mb'])} | {fps} |")
PYEOF
  fi
fi
fi

took
echo
echo "gpu_check: $(( SECONDS - T0 )) s"
if [[ $FAILED -ne 0 ]]; then echo "gpu_check: SOME CHECKS FAILED (details above; files in $WORK)"; exit 1; fi
if [[ -n $DRY && -z "${KEEP:-}" ]]; then where="work files removed"; else where="files in $WORK"; fi
echo "gpu_check: all checks passed${DRY:+ (dry run)} ($where)"
