"""Reference fixtures for cnx-eval, produced by pycocotools 2.0.x (mask API, COCOeval) and
mmsegmentation's IoU formula (its intersect_and_union with torch.histc, float64 accumulation,
np.nanmean). Writes eval/tests/fixtures/eval/: mask.json, coco_expected.json.gz,
coco_results_full.json.gz, miou_expected.json, miou_*.u8.gz (raw uint8 maps, gzip).

Run by `make reference` (or `gen_eval.py mask|coco|miou`); deterministic (seeded, gzip
mtime 0). The fixtures are committed and tests never run Python.
"""
import copy
import io
import json
import os
import sys
import contextlib

import numpy as np
from pycocotools import mask as mu
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Real data copied into the project (see tests/data/README.md).
DATA = os.path.join(ROOT, "tests", "data")
GT_PATH = os.path.join(DATA, "coco-tiny", "annotations", "instances_train2017.json")
ADE = os.path.join(DATA, "ade-sample")
OUT = os.path.join(ROOT, "eval", "tests", "fixtures", "eval")


def s(rle):
    c = rle["counts"]
    return c.decode() if isinstance(c, bytes) else c


def counts_of(rle_str, h, w):
    # Uncompressed counts of a compressed RLE, via pycocotools' own decode + re-encode trip:
    # decode to a mask and run-length it in Fortran order (bit-exact to rleEncode).
    m = mu.decode({"size": [h, w], "counts": rle_str}).reshape(-1, order="F")
    if m.size == 0:
        return [0]
    change = np.flatnonzero(np.diff(m)) + 1
    bounds = np.concatenate([[0], change, [m.size]])
    runs = np.diff(bounds).tolist()
    if m[0] == 1:
        runs = [0] + runs
    return runs


def gen_mask(rng):
    out = {"random": [], "polygons": [], "random_polygons": [], "crowd": [], "iou": []}
    # Random masks: blobs and noise, several shapes (including 1xN and Nx1).
    shapes = [(1, 1), (1, 7), (9, 1), (5, 5), (17, 23), (40, 31), (64, 64)]
    masks = []
    for i in range(40):
        h, w = shapes[i % len(shapes)]
        kind = i % 4
        if kind == 0:
            m = (rng.random((h, w)) < 0.5).astype(np.uint8)
        elif kind == 1:
            m = np.zeros((h, w), np.uint8)
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            m[y0 : y0 + rng.integers(1, h + 1), x0 : x0 + rng.integers(1, w + 1)] = 1
        elif kind == 2:
            m = (rng.random((h, w)) < 0.05).astype(np.uint8)
        else:
            m = np.zeros((h, w), np.uint8) if i % 8 == 3 else np.ones((h, w), np.uint8)
        masks.append(m)
        rle = mu.encode(np.asfortranarray(m))
        out["random"].append({
            "h": h, "w": w,
            "mask_rowmajor": "".join(map(str, m.reshape(-1).tolist())),
            "string": s(rle),
            "counts": counts_of(s(rle), h, w),
            "area": int(mu.area(rle)),
            "bbox": mu.toBbox(rle).tolist(),
        })
    # IoU matrices among random masks of equal shape, with crowd flags.
    by_shape = {}
    for i, m in enumerate(masks):
        by_shape.setdefault(m.shape, []).append(i)
    for shp, idx in by_shape.items():
        rles = [mu.encode(np.asfortranarray(masks[i])) for i in idx]
        crowd = [int(j % 3 == 1) for j in range(len(idx))]
        iou = mu.iou(rles, rles, crowd)
        merged_u = mu.merge(rles, intersect=0)
        merged_i = mu.merge(rles, intersect=1)
        out["iou"].append({
            "idx": idx, "crowd": crowd,
            "iou": np.asarray(iou).tolist(),
            "union": s(merged_u), "intersection": s(merged_i),
        })
    # Random boxes IoU.
    boxes = (rng.random((12, 4)) * [50, 50, 30, 30]).round(2)
    bcrowd = [int(i % 4 == 0) for i in range(12)]
    out["bbox_iou"] = {"boxes": boxes.tolist(), "crowd": bcrowd,
                       "iou": np.asarray(mu.iou(boxes.tolist(), boxes.tolist(), bcrowd)).tolist()}
    out["from_bbox"] = [{"bbox": b.tolist(), "h": 60, "w": 45,
                         "string": s(mu.frPyObjects(b[None].astype(np.double), 60, 45)[0])} for b in boxes]
    # Random polygons: fractional, negative and out-of-image vertices, degenerate edges.
    for i in range(200):
        h, w = int(rng.integers(1, 60)), int(rng.integers(1, 60))
        k = int(rng.integers(3, 12))
        xy = rng.uniform(-5, max(w, h) + 5, size=2 * k)
        if i % 5 == 0:
            xy = np.round(xy * 2) / 2  # half-pixel vertices hit rounding ties
        if i % 7 == 0:
            xy[2:4] = xy[0:2]  # repeated vertex: zero-length edge
        xy = xy.tolist()
        r = mu.frPyObjects([xy], h, w)[0]
        out["random_polygons"].append({"h": h, "w": w, "poly": xy, "string": s(r),
                                       "area": int(mu.area(r)), "bbox": mu.toBbox(r).tolist()})
    # Every coco-tiny annotation through annToRLE (polygons merged; crowd uncompressed RLE).
    coco = quiet(COCO, GT_PATH)
    for ann in coco.dataset["annotations"]:
        img = coco.imgs[ann["image_id"]]
        rle = coco.annToRLE(ann)
        rec = {"id": ann["id"], "h": img["height"], "w": img["width"], "string": s(rle),
               "area": int(mu.area(rle)), "bbox": mu.toBbox(rle).tolist()}
        if isinstance(ann["segmentation"], list):
            rec["parts"] = [s(r) for r in mu.frPyObjects(ann["segmentation"], img["height"], img["width"])]
            out["polygons"].append(rec)
        else:
            out["crowd"].append(rec)
    # IoU between all annotations of each image (crowd flags from the GT), as COCOeval uses it.
    out["ann_iou"] = []
    for img_id in sorted(coco.imgs):
        anns = coco.imgToAnns[img_id]
        rles = [coco.annToRLE(a) for a in anns]
        crowd = [a["iscrowd"] for a in anns]
        out["ann_iou"].append({"image_id": img_id, "ids": [a["id"] for a in anns],
                               "iou": np.asarray(mu.iou(rles, rles, crowd)).tolist(),
                               "bbox_iou": np.asarray(mu.iou([a["bbox"] for a in anns],
                                                             [a["bbox"] for a in anns], crowd)).tolist()})
    return out


def quiet(f, *a, **k):
    with contextlib.redirect_stdout(io.StringIO()):
        return f(*a, **k)


def write(name, obj):
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, name)
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
    print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)")


def main():
    which = sys.argv[1:] or ["mask", "coco", "miou"]
    if "mask" in which:
        write("mask.json", gen_mask(np.random.default_rng(0)))
    if "coco" in which:
        gen_coco(np.random.default_rng(1))
    if "miou" in which:
        gen_miou(np.random.default_rng(2))


DROP_CATS = [5, 13, 40, 90]  # categories whose GT is removed: "categories without GT"


def load_gt_dropped():
    with open(GT_PATH) as f:
        d = json.load(f)
    d["annotations"] = [a for a in d["annotations"] if a["category_id"] not in DROP_CATS]
    return d


def jitter_box(rng, b, sigma, w, h):
    x, y, bw, bh = b
    x = x + rng.normal(0, sigma) * bw
    y = y + rng.normal(0, sigma) * bh
    bw = max(1.0, bw * np.exp(rng.normal(0, sigma)))
    bh = max(1.0, bh * np.exp(rng.normal(0, sigma)))
    x = min(max(x, 0.0), w - 1.0)
    y = min(max(y, 0.0), h - 1.0)
    bw = min(bw, w - x)
    bh = min(bh, h - y)
    return [round(float(v), 2) for v in (x, y, bw, bh)]


def shift_mask(m, dx, dy):
    out = np.zeros_like(m)
    h, w = m.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = m[ys, xs]
    return out


def box_mask(b, h, w, rng):
    m = np.zeros((h, w), np.uint8)
    x0, y0 = int(b[0]), int(b[1])
    x1, y1 = int(np.ceil(b[0] + b[2])), int(np.ceil(b[1] + b[3]))
    if rng.random() < 0.5:
        m[y0:y1, x0:x1] = 1
    else:  # ellipse inside the box
        yy, xx = np.mgrid[0:h, 0:w]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        rx, ry = max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
        m[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] = 1
    return m


def make_results(rng, gt):
    """Detections covering the cases COCOeval distinguishes; each has bbox and an RLE mask."""
    coco = quiet(COCO, GT_PATH)
    imgs = sorted(coco.imgs)
    cats = sorted(coco.cats)
    no_det = set(imgs[3::11])  # images without any detection
    crowded = imgs[5:7]  # images with > 100 detections of one category
    dets = []

    def add(img, cat, box, mask, score):
        rle = mu.encode(np.asfortranarray(mask))
        dets.append({"image_id": img["id"], "category_id": int(cat), "bbox": box,
                     "score": score, "segmentation": {"size": rle["size"], "counts": s(rle)}})

    def score():
        return round(float(rng.random()), 2)  # two decimals: many ties, stable sort matters

    for img_id in imgs:
        if img_id in no_det:
            continue
        img = coco.imgs[img_id]
        h, w = img["height"], img["width"]
        for ann in coco.imgToAnns[img_id]:
            gm = coco.annToMask(ann)
            n = 1 + int(rng.integers(0, 3))
            for j in range(n):
                sigma = [0.02, 0.08, 0.25][int(rng.integers(0, 3))]
                box = jitter_box(rng, ann["bbox"], sigma, w, h)
                dx = int(round(box[0] - ann["bbox"][0]))
                dy = int(round(box[1] - ann["bbox"][1]))
                m = shift_mask(gm, dx, dy)
                if rng.random() < 0.3:  # ragged edge
                    m = m & (rng.random(m.shape) < 0.9).astype(np.uint8)
                cat = ann["category_id"] if rng.random() > 0.1 else int(rng.choice(cats))
                add(img, cat, box, m, score())
                if rng.random() < 0.15:  # exact duplicate, same score
                    dets.append(copy.deepcopy(dets[-1]))
        # false positives of every size
        for j in range(int(rng.integers(2, 12))):
            side = float(np.exp(rng.uniform(np.log(4), np.log(min(h, w) * 0.9))))
            box = [round(float(rng.uniform(0, w - side)), 2), round(float(rng.uniform(0, h - side)), 2),
                   round(side * float(rng.uniform(0.6, 1.0)), 2), round(side, 2)]
            add(img, int(rng.choice(cats)), box, box_mask(box, h, w, rng), score())
        if img_id in crowded:
            ann = coco.imgToAnns[img_id][0]
            gm = coco.annToMask(ann)
            for j in range(130):
                box = jitter_box(rng, ann["bbox"], 0.3, w, h)
                if j % 2:
                    m = box_mask(box, h, w, rng)
                else:
                    m = shift_mask(gm, int(rng.integers(-20, 20)), int(rng.integers(-20, 20)))
                add(img, ann["category_id"], box, m, score())
    return dets


def run_cocoeval(gt_dict, dets, iou_type):
    gt = COCO()
    gt.dataset = copy.deepcopy(gt_dict)
    quiet(gt.createIndex)
    dt = quiet(gt.loadRes, copy.deepcopy(dets))
    E = COCOeval(gt, dt, iou_type)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        E.evaluate()
        E.accumulate()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        E.summarize()
    prec = E.eval["precision"]  # [T,R,K,A,M]
    T, R, K, A, M = prec.shape
    rows = []  # run-length coded rows precision[t, :, k, a, m], C order over (t, k, a, m)
    for t in range(T):
        for k in range(K):
            for a in range(A):
                for m in range(M):
                    row = prec[t, :, k, a, m]
                    i = 0
                    while i < R:
                        j = i
                        while j < R and row[j] == row[i]:
                            j += 1
                        rows.append(float(row[i]))
                        rows.append(j - i)
                        i = j
    per_cat = []
    for k in range(K):
        p = prec[:, :, k, 0, -1]
        p = p[p > -1]
        per_cat.append(float(np.mean(p)) if p.size else None)
    return {"iou_type": iou_type, "stats": [float(x) for x in E.stats], "summary_text": buf.getvalue(),
            "counts": [T, R, K, A, M], "precision_rle": rows,
            "recall": E.eval["recall"].reshape(-1).tolist(), "per_category_ap": per_cat,
            "cat_ids": [int(c) for c in E.params.catIds],
            "iou_thrs": E.params.iouThrs.tolist(), "rec_thrs": E.params.recThrs.tolist()}


def gen_coco(rng):
    gt = load_gt_dropped()
    dets = make_results(rng, gt)
    bbox_res = [{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in dets]
    segm_res = [{k: d[k] for k in ("image_id", "category_id", "segmentation", "score")} for d in dets]
    cases = {
        "bbox": (bbox_res, "bbox"),
        "segm": (segm_res, "segm"),
        "segm_with_bbox": (dets, "segm"),  # first result has a bbox: area = w*h (loadRes quirk)
        "segm_results_bbox": (segm_res, "bbox"),  # boxes from toBbox of the RLEs
        "bbox_as_segm": (bbox_res, "segm"),  # boxes become square polygons
    }
    out = {"drop_categories": DROP_CATS, "cases": {}}
    results = {}
    for name, (res, iou_type) in cases.items():
        out["cases"][name] = run_cocoeval(gt, res, iou_type)
        out["cases"][name]["results"] = {"bbox": "bbox", "segm": "segm", "segm_with_bbox": "full",
                                         "segm_results_bbox": "segm", "bbox_as_segm": "bbox"}[name]
        print(name, " ".join(f"{x:.4f}" for x in out["cases"][name]["stats"]))
    # Only the full results are stored; the tests derive the bbox-only / segm-only variants
    # by dropping a field, as done above.
    write_gz("coco_results_full.json.gz", dets)
    write_gz("coco_expected.json.gz", out)
    print(f"{len(dets)} detections")


def write_gz(name, obj):
    import gzip
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, name)
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(json.dumps(obj, separators=(",", ":")).encode())
    print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)")


def mmseg_intersect_and_union(pred, label, num_classes, ignore_index=255, reduce_zero_label=False):
    """mmseg's intersect_and_union (torch.histc over [0, num_classes - 1])."""
    import torch
    pred = torch.from_numpy(pred.astype(np.int64))
    label = torch.from_numpy(label.copy())
    if reduce_zero_label:
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    label = label.long()
    mask = label != ignore_index
    pred = pred[mask]
    label = label[mask]
    inter = pred[pred == label]
    h = lambda x: torch.histc(x.float(), bins=num_classes, min=0, max=num_classes - 1)
    ai, ap, al = h(inter), h(pred), h(label)
    return ai, ap + al - ai, ap, al


def mmseg_metrics(pairs, num_classes, reduce_zero_label):
    """mmseg's total_intersect_and_union + total_area_to_metrics + the summary (percent)."""
    import torch
    ti = torch.zeros(num_classes, dtype=torch.float64)
    tu, tp, tl = ti.clone(), ti.clone(), ti.clone()
    for pred, label in pairs:
        ai, au, ap, al = mmseg_intersect_and_union(pred, label, num_classes, 255, reduce_zero_label)
        ti += ai; tu += au; tp += ap; tl += al
    aacc = (ti.sum() / tl.sum()).item()
    iou = (ti / tu).numpy()
    acc = (ti / tl).numpy()
    return {"aAcc": aacc * 100, "mIoU": float(np.nanmean(iou) * 100), "mAcc": float(np.nanmean(acc) * 100),
            "IoU": [None if np.isnan(v) else float(v * 100) for v in iou],
            "Acc": [None if np.isnan(v) else float(v * 100) for v in acc],
            "intersect": ti.long().tolist(), "union": tu.long().tolist(),
            "pred_area": tp.long().tolist(), "label_area": tl.long().tolist()}


def gen_miou(rng):
    import gzip
    from PIL import Image
    ann_dir = os.path.join(ADE, "annotations", "validation")
    names = sorted(f[:-4] for f in os.listdir(ann_dir) if f.endswith(".png"))
    labels = [np.array(Image.open(os.path.join(ann_dir, n + ".png"))) for n in names]
    preds = []
    for lab in labels:
        # A plausible prediction: the reduced label, shifted, with noisy blocks and random
        # classes where the label is "other" (0).
        p = lab.astype(np.int64) - 1
        p[p < 0] = rng.integers(0, 150, size=int((p < 0).sum()))
        p = np.roll(p, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1))
        noise = rng.random(p.shape) < 0.05
        p[noise] = rng.integers(0, 150, size=int(noise.sum()))
        h, w = p.shape
        for _ in range(10):
            y, x = int(rng.integers(0, h - 20)), int(rng.integers(0, w - 20))
            p[y:y + 20, x:x + 20] = int(rng.integers(0, 150))
        preds.append(p.astype(np.uint8))
    ade = {"names": names, "shapes": [list(l.shape) for l in labels],
           "reduce": mmseg_metrics(list(zip(preds, labels)), 150, True)}
    # Random data: 19 classes, labels with 255 and out-of-range values, with and without
    # zero-label reduction; and a class never present anywhere (NaN IoU).
    rand = []
    for i in range(6):
        h, w = int(rng.integers(5, 70)), int(rng.integers(5, 70))
        lab = rng.integers(0, 21, size=(h, w)).astype(np.uint8)
        lab[lab == 7] = 8
        lab[rng.random((h, w)) < 0.1] = 255
        pred = rng.integers(0, 19, size=(h, w)).astype(np.uint8)
        pred[pred == 7] = 8
        agree = rng.random((h, w)) < 0.4
        pred[agree & (lab < 19)] = lab[agree & (lab < 19)]
        rand.append((pred, lab))
    random_case = {"shapes": [list(p.shape) for p, _ in rand],
                   "plain": mmseg_metrics(rand, 19, False),
                   "reduce": mmseg_metrics([(np.where(p >= 18, 0, p).astype(np.uint8), l) for p, l in rand], 18, True)}
    out = {"ade": ade, "random": random_case, "num_classes_random": 19}
    write("miou_expected.json", out)
    raw = b"".join(p.tobytes() for p in preds)
    raw_rand = b"".join(p.tobytes() + l.tobytes() for p, l in rand)
    for name, data in (("miou_ade_preds.u8.gz", raw), ("miou_random.u8.gz", raw_rand)):
        path = os.path.join(OUT, name)
        with gzip.GzipFile(path, "wb", mtime=0) as f:
            f.write(data)
        print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)")
    print("ade mIoU", ade["reduce"]["mIoU"], "aAcc", ade["reduce"]["aAcc"])


if __name__ == "__main__":
    main()
