"""Helper of bench/eval_coco.sh: generates a val2017-scale COCO workload and runs the Python
reference evaluators on it.

  gen DIR                      write DIR/gt.json, DIR/results_bbox.json, DIR/results_segm.json
  pycocotools GT RES TYPE OUT  COCOeval (pycocotools) -> OUT (stats JSON)
  faster GT RES TYPE OUT       COCOeval_faster (faster-coco-eval) -> OUT
  report DIR                   print the table from DIR/*.time and DIR/*.stats.json

The workload: 5,000 images of COCO-like sizes, about 36,000 ground-truth instances (polygons,
COCO's small/medium/large mix, ~1% crowd regions as uncompressed RLE), 100 detections per
image (jittered true objects, duplicates and false positives) with boxes and compressed RLE
masks. Deterministic (seeded).
"""
import contextlib
import io
import json
import os
import sys

import numpy as np

N_IMAGES = 5000
DETS_PER_IMAGE = 100
MEAN_GT = 7.3  # val2017: 36,781 instances / 5,000 images
CROWD_SHARE = 0.011
SIZES = [(480, 640), (640, 480), (427, 640), (640, 427), (375, 500), (500, 375), (512, 640), (612, 612)]
# COCO categories ids (80 of 1..90)
CAT_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
           28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
           54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
           81, 82, 84, 85, 86, 87, 88, 89, 90]


def star_polygon(rng, cx, cy, bw, bh, h, w):
    k = int(rng.integers(8, 25))
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = rng.uniform(0.6, 1.0, k)
    x = np.clip(cx + np.cos(ang) * rad * bw / 2, 0, w)
    y = np.clip(cy + np.sin(ang) * rad * bh / 2, 0, h)
    return np.round(np.stack([x, y], 1).reshape(-1), 2).tolist()


def poly_box(p):
    x, y = p[0::2], p[1::2]
    return [min(x), min(y), round(max(x) - min(x), 2), round(max(y) - min(y), 2)]


def sample_size(rng):
    """sqrt(area) with COCO's mix: 41% small, 34% medium, 25% large (of the polygon area)."""
    u = rng.random()
    # the star polygon covers ~0.6 of its box; scale the box so the mask lands in the class
    if u < 0.41:
        s = rng.uniform(6, 32)
    elif u < 0.75:
        s = rng.uniform(32, 96)
    else:
        s = rng.uniform(96, 400)
    return s / np.sqrt(0.62)


def gen(out):
    from pycocotools import mask as mu

    rng = np.random.default_rng(2017)
    os.makedirs(out, exist_ok=True)
    images, anns, dets_b, dets_s = [], [], [], []
    cat_p = np.ones(len(CAT_IDS))
    cat_p[0] = 20.0  # person-heavy, like COCO
    cat_p /= cat_p.sum()
    ann_id = 1
    for i in range(N_IMAGES):
        img_id = 100000 + i * 7
        h, w = SIZES[int(rng.integers(0, len(SIZES)))]
        images.append({"id": img_id, "height": h, "width": w, "file_name": f"{img_id:012d}.jpg"})
        n = int(min(rng.geometric(1.0 / MEAN_GT) - 1 + int(rng.random() < 0.99), 60))
        objs = []
        for _ in range(n):
            s = sample_size(rng)
            r = float(np.exp(rng.normal(0, 0.5)))
            bw, bh = min(s * np.sqrt(r), w), min(s / np.sqrt(r), h)
            cx, cy = rng.uniform(bw / 2, w - bw / 2 + 1e-6), rng.uniform(bh / 2, h - bh / 2 + 1e-6)
            cat = int(rng.choice(CAT_IDS, p=cat_p))
            poly = star_polygon(rng, cx, cy, bw, bh, h, w)
            rle = mu.frPyObjects([poly], h, w)[0]
            area = float(mu.area(rle))
            if area < 1:
                continue
            crowd = rng.random() < CROWD_SHARE
            if crowd:
                m = mu.decode(rle).reshape(-1, order="F")
                change = np.flatnonzero(np.diff(m)) + 1
                runs = np.diff(np.concatenate([[0], change, [m.size]])).tolist()
                if m[0] == 1:
                    runs = [0] + runs
                seg = {"size": [h, w], "counts": runs}
            else:
                seg = [poly]
            box = poly_box(poly)
            anns.append({"id": ann_id, "image_id": img_id, "category_id": cat, "segmentation": seg,
                         "area": area, "bbox": box, "iscrowd": int(crowd)})
            ann_id += 1
            objs.append((cx, cy, bw, bh, cat))
        # detections: 1-4 jittered copies of each object, false positives up to 100
        cand = []
        for (cx, cy, bw, bh, cat) in objs:
            for _ in range(int(rng.integers(1, 5))):
                sig = [0.03, 0.1, 0.3][int(rng.integers(0, 3))]
                c = cat if rng.random() > 0.1 else int(rng.choice(CAT_IDS))
                cand.append((cx + rng.normal(0, sig) * bw, cy + rng.normal(0, sig) * bh,
                             bw * np.exp(rng.normal(0, sig)), bh * np.exp(rng.normal(0, sig)), c,
                             0.3 + 0.7 * rng.random()))
        cand = cand[:DETS_PER_IMAGE]
        while len(cand) < DETS_PER_IMAGE:
            s = sample_size(rng)
            bw, bh = min(s, w), min(s * float(np.exp(rng.normal(0, 0.4))), h)
            cand.append((rng.uniform(0, w), rng.uniform(0, h), bw, bh, int(rng.choice(CAT_IDS, p=cat_p)),
                         0.6 * rng.random()))
        for (cx, cy, bw, bh, cat, score) in cand:
            cx, cy = float(np.clip(cx, 1, w - 1)), float(np.clip(cy, 1, h - 1))
            poly = star_polygon(rng, cx, cy, max(bw, 2.0), max(bh, 2.0), h, w)
            rle = mu.frPyObjects([poly], h, w)[0]
            sc = round(float(score), 3)
            dets_b.append({"image_id": img_id, "category_id": cat, "bbox": poly_box(poly), "score": sc})
            dets_s.append({"image_id": img_id, "category_id": cat, "score": sc,
                           "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}})
        if i % 500 == 0:
            print(f"  generated {i}/{N_IMAGES} images", file=sys.stderr)
    cats = [{"id": c, "name": f"class{c}", "supercategory": "x"} for c in CAT_IDS]
    for name, obj in (("gt.json", {"images": images, "annotations": anns, "categories": cats}),
                      ("results_bbox.json", dets_b), ("results_segm.json", dets_s)):
        with open(os.path.join(out, name), "w") as f:
            json.dump(obj, f, separators=(",", ":"))
    crowd = sum(a["iscrowd"] for a in anns)
    print(f"workload: {len(images)} images, {len(anns)} GT ({crowd} crowd), {len(dets_b)} detections",
          file=sys.stderr)


def run(lib, gt, res, iou_type, out):
    if lib == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval as E
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as E
    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO(gt)
        d = g.loadRes(res)
        e = E(g, d, iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    with open(out, "w") as f:
        json.dump([float(x) for x in e.stats[:12]], f)


def parse_time(path):
    wall = rss = None
    for line in open(path):
        line = line.strip()
        if line.startswith("Elapsed (wall clock) time"):
            t = line.split(": ", 1)[1 if ": " in line else 0].split()[-1]
            parts = [float(x) for x in t.split(":")]
            wall = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
        elif line.startswith("Maximum resident set size"):
            rss = int(line.split(":")[1]) / 1024.0
    return wall, rss


def report(d):
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    print(f"\n{'type':<5} {'tool':<18} {'wall s':>8} {'peak RSS MB':>12} {'vs pycocotools':>15} {'max |dstat|':>12}")
    for t in ("bbox", "segm"):
        base = {}
        rows = []
        for tool in ("pycocotools", "faster-coco-eval", "cnx-eval", "cnx"):
            if not os.path.exists(os.path.join(d, f"{tool}.{t}.time")):
                continue  # `cnx eval` is optional (its binary needs libtorch)
            wall, rss = parse_time(os.path.join(d, f"{tool}.{t}.time"))
            sp = os.path.join(d, f"{tool}.{t}.stats.json")
            st = json.load(open(sp))
            if isinstance(st, dict):
                st = [st[t][k] for k in keys]
            rows.append((tool, wall, rss, st))
            if tool == "pycocotools":
                base = {"wall": wall, "stats": st}
        for tool, wall, rss, st in rows:
            diff = max(abs(a - b) for a, b in zip(st, base["stats"]))
            print(f"{t:<5} {tool:<18} {wall:>8.2f} {rss:>12.0f} {base['wall'] / wall:>14.1f}x {diff:>12.1e}")
        print(f"{t:<5} AP (pycocotools) {base['stats'][0]:.6f}")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "gen":
        gen(sys.argv[2])
    elif cmd in ("pycocotools", "faster"):
        run(cmd, *sys.argv[2:6])
    elif cmd == "report":
        report(sys.argv[2])
    else:
        sys.exit(__doc__)
