"""`make parity`: full-size parity checks that are too big for committed fixtures.

Each step writes reference data for a full-size model under tools/reference/.cache/ (ignored by
git) and runs the matching ignored Rust test against it. Steps are listed in STEPS; add yours.

  convnext_tiny   gen_backbone.py --full convnext_tiny (timm logits + official dense features at
                  224x224 batch 2 and 320x448), then backbone/tests/convnext_parity.rs
                  `full_size_parity` (max abs error 1e-4, fp32) from the official .pth and the timm
                  safetensors weights.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable
CACHE = os.path.join(ROOT, "tools", "reference", ".cache")


def run(cmd, env=None):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, **(env or {})})


def convnext_tiny():
    out = os.path.join(CACHE, "parity_convnext_tiny")
    run([PY, "tools/reference/gen_backbone.py", "--full", "convnext_tiny", "--out", out])
    run(["cargo", "test", "--release", "-p", "cnx-backbone", "--test", "convnext_parity", "full_size_parity",
         "--", "--ignored", "--nocapture"], env={"CNX_PARITY_DIR": out})


STEPS = [convnext_tiny]


def main():
    only = sys.argv[1:]
    for step in STEPS:
        if only and step.__name__ not in only:
            continue
        print(f"== parity: {step.__name__}", flush=True)
        step()


if __name__ == "__main__":
    main()
