"""Benchmark helper for bench/cascade.sh: CPU inference of ConvNeXt-T Cascade Mask R-CNN on one
COCO image at test scale (1333, 800), mmdetection 2.28's CascadeRCNN (reference) vs cnx (same
weights, same threads). Modes: `prepare OUTDIR` writes random full-size weights (mmdet names,
safetensors) and the preprocessed image; `ref OUTDIR THREADS RUNS` times mmdet and prints the
median seconds and the number of detections."""
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools", "reference"))
import gen_detection as gd  # noqa: E402  (installs the mmcv._ext shim)
import gen_cascade as gc  # noqa: E402

gd.SCALE = (1333, 800)
gd.IMAGES = ["000000008193.jpg"]


def main():
    mode, out = sys.argv[1], sys.argv[2]
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    model = gc.build_model([3, 3, 9, 3], [96, 192, 384, 768], 256, 1024).eval()
    if mode == "prepare":
        os.makedirs(out, exist_ok=True)
        sd = gc.random_weights(model)
        save_file(sd, os.path.join(out, "weights.safetensors"))
        imgs, metas, batch = gd.load_images()
        m = metas[0]
        save_file({"image": batch.contiguous(),
                   "img_shape": torch.tensor(m["img_shape"][:2]), "ori_shape": torch.tensor(m["ori_shape"][:2]),
                   "scale_factor": torch.from_numpy(m["scale_factor"][:2].copy())},
                  os.path.join(out, "input.safetensors"))
        return
    threads, runs = int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    model.load_state_dict(load_file(os.path.join(out, "weights.safetensors")))
    imgs, metas, batch = gd.load_images()
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
