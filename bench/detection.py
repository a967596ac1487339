"""Benchmark helper for bench/detection.sh: CPU inference of a ConvNeXt-T detector on one COCO
image at test scale (1333, 800), mmdetection 2.28 (reference) vs cnx (same weights, same
threads). ARCH is `mask_rcnn` (MaskRCNN) or `cascade` (CascadeRCNN). Modes: `prepare ARCH OUTDIR`
writes random full-size weights (mmdet names, safetensors) and the preprocessed image;
`ref ARCH OUTDIR THREADS RUNS` times mmdet and prints the median seconds and the number of
detections."""
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools", "reference"))
import gen_detection as gd  # noqa: E402  (installs the mmcv._ext shim)
import gen_cascade as gc  # noqa: E402

gd.DEPTHS, gd.DIMS, gd.C, gd.FC, gd.NCLS = [3, 3, 9, 3], [96, 192, 384, 768], 256, 1024, 80
gd.SCALE = (1333, 800)
gd.IMAGES = ["000000008193.jpg"]


def build(arch):
    """The reference network and its random-weight generator."""
    torch.manual_seed(0)
    if arch == "mask_rcnn":
        return gd.build_model().eval(), gd.random_weights
    if arch == "cascade":
        return gc.build_model(gd.DEPTHS, gd.DIMS, gd.C, gd.FC).eval(), gc.random_weights
    sys.exit(f"unknown ARCH {arch!r} (mask_rcnn | cascade)")


def main():
    mode, arch, out = sys.argv[1], sys.argv[2], sys.argv[3]
    from safetensors.torch import load_file, save_file
    model, random_weights = build(arch)
    if mode == "prepare":
        os.makedirs(out, exist_ok=True)
        save_file(random_weights(model), os.path.join(out, "weights.safetensors"))
        imgs, metas, batch = gd.load_images()
        m = metas[0]
        save_file({"image": batch.contiguous(),
                   "img_shape": torch.tensor(m["img_shape"][:2]), "ori_shape": torch.tensor(m["ori_shape"][:2]),
                   "scale_factor": torch.from_numpy(m["scale_factor"][:2].copy())},
                  os.path.join(out, "input.safetensors"))
        return
    threads, runs = int(sys.argv[4]), int(sys.argv[5])
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
