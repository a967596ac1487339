"""Benchmark helper for bench/detection.sh: CPU inference of ConvNeXt-T Mask R-CNN on one
COCO image at test scale (1333, 800), mmdetection 2.28 (reference) vs cnx (same weights, same
threads). Modes: `prepare OUTDIR` writes random full-size weights (mmdet names, safetensors) and
the preprocessed image; `ref OUTDIR THREADS RUNS` times mmdet and prints the median seconds."""
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools", "reference"))
import gen_detection as g  # noqa: E402  (installs the mmcv._ext shim)

g.DEPTHS, g.DIMS, g.C, g.FC, g.NCLS = [3, 3, 9, 3], [96, 192, 384, 768], 256, 1024, 80
g.SCALE = (1333, 800)
g.IMAGES = ["000000008193.jpg"]


def main():
    mode, out = sys.argv[1], sys.argv[2]
    from safetensors.torch import load_file, save_file
    model = g.build_model().eval()
    if mode == "prepare":
        os.makedirs(out, exist_ok=True)
        sd = g.random_weights(model)
        save_file(sd, os.path.join(out, "weights.safetensors"))
        imgs, metas, batch = g.load_images()
        m = metas[0]
        save_file({"image": batch.contiguous(),
                   "img_shape": torch.tensor(m["img_shape"][:2]), "ori_shape": torch.tensor(m["ori_shape"][:2]),
                   "scale_factor": torch.from_numpy(m["scale_factor"][:2].copy())},
                  os.path.join(out, "input.safetensors"))
        return
    threads, runs = int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    model.load_state_dict(load_file(os.path.join(out, "weights.safetensors")))
    imgs, metas, batch = g.load_images()
    times = []
    with torch.no_grad():
        for _ in range(runs + 1):
            t = time.perf_counter()
            res = model.simple_test(batch, metas, rescale=True)
            times.append(time.perf_counter() - t)
    n = sum(len(b) for b in res[0][0])
    print(f"{statistics.median(times[1:]):.4f} {n}")


if __name__ == "__main__":
    main()
