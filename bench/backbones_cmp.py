"""Reference side of bench/backbones_cmp.sh: timm Swin-T and torchvision ResNet-50 classifier
forward on CPU (batch 8 at 224, eval, no grad), median of several runs after warm-up.
Prints `MODEL MEDIAN_MS` lines like the Rust example."""
import os
import statistics
import sys
import time

import timm
import torch
import torchvision

torch.set_grad_enabled(False)
batch = int(os.environ.get("BENCH_BATCH", "8"))
runs = int(os.environ.get("BENCH_RUNS", "5"))
x = torch.randn(batch, 3, 224, 224)
models = {
    "swin_tiny": lambda: timm.create_model("swin_tiny_patch4_window7_224"),
    "resnet50": lambda: torchvision.models.resnet50(),
}
for name in sys.argv[1:] or list(models):
    m = models[name]().eval()
    for _ in range(2):
        m(x)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        m(x)
        ts.append((time.perf_counter() - t) * 1e3)
    print(f"{name} {statistics.median(ts):.1f}")
