"""Reference side of bench/datasets.sh.

  datasets.py pipeline ANN IMG_DIR N WORKERS [--masks]
      mmdet 2.x's own COCO train pipeline (the ConvNeXt config: LoadImageFromFile,
      LoadAnnotations, RandomFlip 0.5, AutoAugment of the two policies, Normalize, Pad 32,
      DefaultFormatBundle), cv2 single-threaded per worker as mmdet's workers run it; WORKERS
      processes share the N samples (as DataLoader workers). Prints images/s as JSON.
  datasets.py gen-big OUT.json
      An instances JSON shaped like instances_train2017 (118,287 images, 860,001 annotations,
      80 categories, polygons of realistic length, ~1% crowd RLE).
  datasets.py parse ANN
      pycocotools COCO(ANN) (load + index); prints seconds as JSON (RSS measured outside).
  datasets.py report DIR
      Table of the results in DIR.
"""
import json
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")


def build_mmdet(ann, img_dir, masks):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools", "reference"))
    import mmcv_ext_shim

    mmcv_ext_shim.install()
    import cv2
    import torch
    from mmdet.datasets import CocoDataset

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    scales = [(s, 1333) for s in range(480, 801, 32)]
    norm = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
    pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=masks),
        dict(type="RandomFlip", flip_ratio=0.5),
        dict(type="AutoAugment", policies=[
            [dict(type="Resize", img_scale=scales, multiscale_mode="value", keep_ratio=True)],
            [dict(type="Resize", img_scale=[(400, 1333), (500, 1333), (600, 1333)],
                  multiscale_mode="value", keep_ratio=True),
             dict(type="RandomCrop", crop_type="absolute_range", crop_size=(384, 600),
                  allow_negative_crop=True),
             dict(type="Resize", img_scale=scales, multiscale_mode="value", override=True,
                  keep_ratio=True)]]),
        dict(type="Normalize", **norm),
        dict(type="Pad", size_divisor=32),
        dict(type="DefaultFormatBundle"),
        dict(type="Collect", keys=["img", "gt_bboxes", "gt_labels"] + (["gt_masks"] if masks else [])),
    ]
    return CocoDataset(ann, pipeline, img_prefix=img_dir + "/", filter_empty_gt=True)


def worker(ann, img_dir, masks, ks, ready, go):
    """One DataLoader-like worker: builds the dataset, warms up, waits for the start signal."""
    import io
    import contextlib
    import numpy as np
    with contextlib.redirect_stdout(io.StringIO()):
        ds = build_mmdet(ann, img_dir, masks)
    np.random.seed(len(ks))
    m = len(ds)
    for k in range(2):
        ds[k % m]
    ready.put(1)
    go.wait()
    for k in ks:
        ds[k % m]


def mmdet_pipeline(ann, img_dir, n, workers, masks):
    # Separate spawned processes (forking after torch/OpenMP initialisation can deadlock);
    # timing starts when every worker is ready.
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    ready, go = ctx.Queue(), ctx.Event()
    chunks = [list(range(i, n, workers)) for i in range(workers)]
    procs = [ctx.Process(target=worker, args=(ann, img_dir, masks, c, ready, go)) for c in chunks]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get()
    t = time.perf_counter()
    go.set()
    for p in procs:
        p.join()
    secs = time.perf_counter() - t
    print(json.dumps({"images": n, "threads": workers, "seconds": secs, "images_per_s": n / secs,
                      "masks": masks}))


def gen_big(out):
    import numpy as np
    rng = np.random.default_rng(0)
    n_img, n_ann = 118287, 860001
    cats = list(range(1, 91))
    cats = [c for c in cats if c not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    with open(out, "w") as f:
        f.write('{"info": {"description": "synthetic train2017-sized"}, "licenses": [], "images": [')
        ws = rng.integers(300, 641, n_img)
        hs = rng.integers(240, 641, n_img)
        for i in range(n_img):
            f.write(("," if i else "") + json.dumps({
                "license": 1, "file_name": f"{i + 1:012d}.jpg", "coco_url": "", "height": int(hs[i]),
                "width": int(ws[i]), "date_captured": "2013-11-14 16:28:13", "flickr_url": "", "id": i + 1}))
        f.write('], "annotations": [')
        img_of = rng.integers(0, n_img, n_ann)
        for j in range(n_ann):
            i = int(img_of[j])
            w, h = int(ws[i]), int(hs[i])
            bw, bh = float(rng.uniform(2, w / 2)), float(rng.uniform(2, h / 2))
            x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
            crowd = rng.random() < 0.01
            if crowd:
                counts = [int(v) for v in rng.integers(1, 200, 40)]
                counts.append(max(1, w * h - sum(counts)))
                seg = {"counts": counts, "size": [h, w]}
            else:
                k = int(rng.integers(6, 30))
                t = np.sort(rng.uniform(0, 2 * np.pi, k))
                px = x + bw / 2 + bw / 2 * np.cos(t)
                py = y + bh / 2 + bh / 2 * np.sin(t)
                seg = [[round(float(v), 2) for pair in zip(px, py) for v in pair]]
            f.write(("," if j else "") + json.dumps({
                "segmentation": seg, "area": round(bw * bh * 0.7, 4), "iscrowd": int(crowd),
                "image_id": i + 1, "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
                "category_id": cats[int(rng.integers(0, 80))], "id": j + 1}))
        f.write('], "categories": [')
        f.write(",".join(json.dumps({"supercategory": "s", "id": c, "name": f"class{c}"}) for c in cats))
        f.write("]}")


def parse(ann):
    from pycocotools.coco import COCO
    import contextlib
    import io
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO(ann)
    secs = time.perf_counter() - t
    print(json.dumps({"seconds": secs, "images": len(c.imgs), "annotations": len(c.anns)}))


def maxrss_mib(path):
    for line in open(path):
        if "Maximum resident set size" in line:
            return int(line.split()[-1]) / 1024
    return float("nan")


def report(d):
    def load(name):
        return json.loads(open(os.path.join(d, name)).read().strip().splitlines()[-1])

    print()
    print("COCO train pipeline (decode + flip + policy + normalize + pad), coco-tiny images")
    print(f"{'masks':>6} {'threads':>7} {'mmdet (img/s)':>14} {'cnx (img/s)':>12} {'ratio':>6}")
    for masks in ["nomask", "mask"]:
        for t in (1, 2):
            try:
                py, rs = load(f"py.{masks}.{t}.json"), load(f"rs.{masks}.{t}.json")
            except FileNotFoundError:
                continue
            print(f"{masks == 'mask'!s:>6} {t:>7} {py['images_per_s']:>14.1f} {rs['images_per_s']:>12.1f} "
                  f"{rs['images_per_s'] / py['images_per_s']:>5.1f}x")
    try:
        py, rs = load("parse.py.json"), load("parse.rs.json")
        pr, rr = maxrss_mib(os.path.join(d, "parse.py.time")), maxrss_mib(os.path.join(d, "parse.rs.time"))
        print()
        print("instances JSON parse (118,287 images, 860,001 annotations)")
        print(f"{'':>12} {'seconds':>8} {'peak RSS (MiB)':>15}")
        print(f"{'pycocotools':>12} {py['seconds']:>8.2f} {pr:>15.0f}")
        print(f"{'cnx':>12} {rs['parse_seconds']:>8.2f} {rr:>15.0f}")
        print(f"ratio: {py['seconds'] / rs['parse_seconds']:.1f}x faster, {pr / rr:.1f}x less memory")
    except FileNotFoundError:
        pass


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "pipeline":
        mmdet_pipeline(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), "--masks" in sys.argv)
    elif cmd == "gen-big":
        gen_big(sys.argv[2])
    elif cmd == "parse":
        parse(sys.argv[2])
    elif cmd == "report":
        report(sys.argv[2])
