#!/usr/bin/env bash
# convnext_tiny forward (batch 8, 224x224, CPU, no-grad): cnx vs timm in PyTorch eager, same
# machine, same thread count, separate processes (so peak RSS is each one's own). Prints both
# medians, the ratio cnx/pytorch (goal <= 1.05) and peak RSS of each (goal: within 10%).
# Env: ITERS (default 20), THREADS (default: all cores), MODEL, BATCH, SIZE.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/cnx}
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-convnext_tiny}
BATCH=${BATCH:-8}
SIZE=${SIZE:-224}
ITERS=${ITERS:-20}
THREADS=${THREADS:-$(nproc)}
common=(--model "$MODEL" --batch "$BATCH" --size "$SIZE" --iters "$ITERS" --threads "$THREADS" --device cpu)

# Alternate the order across two rounds so neither side always runs on a cooler machine.
ours1=$("$BIN" bench-forward "${common[@]}")
theirs1=$("$PY" bench/backbone.py "${common[@]}")
theirs2=$("$PY" bench/backbone.py "${common[@]}")
ours2=$("$BIN" bench-forward "${common[@]}")

"$PY" - "$ours1" "$ours2" "$theirs1" "$theirs2" <<'PYEOF'
import json, sys
o1, o2, t1, t2 = (json.loads(s) for s in sys.argv[1:5])
ours = min(o1["median_ms"], o2["median_ms"])
theirs = min(t1["median_ms"], t2["median_ms"])
rss_o = max(o1["peak_rss_kib"], o2["peak_rss_kib"]) / 1024
rss_t = max(t1["peak_rss_kib"], t2["peak_rss_kib"]) / 1024
print(f"{o1['model']} forward, batch {o1['batch']}, {o1['size']}x{o1['size']}, CPU fp32, no-grad, {o1['threads']} threads")
print(f"| impl | median ms/forward (best of 2 runs) | peak RSS MiB |")
print(f"|---|---|---|")
print(f"| cnx (tch) | {ours:.1f} | {rss_o:.0f} |")
print(f"| PyTorch eager (timm) | {theirs:.1f} | {rss_t:.0f} |")
print(f"ratio cnx/pytorch time {ours / theirs:.3f} (goal <= 1.05), RSS {rss_o / rss_t:.3f} (goal <= 1.10)")
PYEOF
