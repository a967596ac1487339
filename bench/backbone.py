"""PyTorch side of bench/backbone.sh: timm's convnext_* forward in eager mode, no-grad, the same
batch / size / thread count as `cnx bench-forward`. Prints one JSON object with the median and
mean milliseconds per forward and the process's peak RSS (ru_maxrss, KiB — the same quantity as
VmHWM that the Rust side reads)."""
import argparse
import json
import resource
import statistics
import time

import torch
import timm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="convnext_tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--channels-last", action="store_true")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    model = timm.create_model(a.model, pretrained=False).eval().to(dev)
    x = torch.randn(a.batch, 3, a.size, a.size, device=dev)
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            y = model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return y

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.iters):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({
        "impl": "pytorch",
        "model": a.model,
        "batch": a.batch,
        "size": a.size,
        "device": a.device,
        "bf16": a.bf16,
        "channels_last": a.channels_last,
        "threads": torch.get_num_threads(),
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }))


if __name__ == "__main__":
    main()
