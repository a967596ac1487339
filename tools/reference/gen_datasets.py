"""Reference fixtures for cnx-datasets, made with the tools the paper's code used:
cv2 (through mmcv 1.x) for resizing and HSV, pycocotools for mask rasterization, mmdet 2.x
BitmapMasks/PolygonMasks and pipeline transforms, mmseg 0.x PhotoMetricDistortion.

Writes PNGs and one JSON under datasets/tests/fixtures/datasets/. Inputs are PNG (lossless) so
both sides start from identical pixels.
"""
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(__file__))
import mmcv_ext_shim  # noqa: E402

mmcv_ext_shim.install()

import cv2  # noqa: E402
import mmcv  # noqa: E402
import numpy as np  # noqa: E402
import pycocotools.mask as mu  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from mmdet.core.mask import BitmapMasks, PolygonMasks  # noqa: E402
from mmdet.datasets.pipelines import Pad, RandomCrop, RandomFlip, Resize  # noqa: E402
import mmseg.datasets.pipelines.transforms as mmseg_tf  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
OUT = os.path.join(ROOT, "datasets", "tests", "fixtures", "datasets")
COCO_DIR = os.path.join(ROOT, "tests", "data", "coco-tiny")
os.makedirs(OUT, exist_ok=True)
rng = np.random.RandomState(0)
fx = {}


def save_rgb(name, img_bgr):
    cv2.imwrite(os.path.join(OUT, name), img_bgr)


def save_gray(name, img):
    cv2.imwrite(os.path.join(OUT, name), img)


# ---- inputs -------------------------------------------------------------------------------
ann = COCO(os.path.join(COCO_DIR, "annotations", "instances_train2017.json"))
img_ids = sorted(ann.getImgIds())
first = ann.loadImgs(img_ids[0])[0]
full = cv2.imread(os.path.join(COCO_DIR, "train2017", first["file_name"]),
                  cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
in_a = np.ascontiguousarray(full[100:220, 150:310])  # 160x120 (w x h), BGR
save_rgb("in_a.png", in_a)
in_b = rng.randint(0, 256, size=(23, 37, 3), dtype=np.uint8)
save_rgb("in_b.png", in_b)
in_lab = np.kron(rng.randint(0, 151, size=(9, 13)), np.ones((5, 5), dtype=np.int64)).astype(np.uint8)  # 65x45
save_gray("in_lab.png", in_lab)

# ---- bilinear / nearest resize (mmcv.imresize = cv2.resize) -------------------------------
resize_cases = []
for src, name in [(in_a, "in_a"), (in_b, "in_b")]:
    h, w = src.shape[:2]
    for k, (dw, dh) in enumerate([(w * 2 // 2 // 2, h // 2), (int(w * 1.37 + 0.5), int(h * 1.37 + 0.5)),
                                  (int(w * 0.43 + 0.5), int(h * 0.61 + 0.5)), (w + 1, h - 1)]
                                 + ([(3 * w, 2 * h)] if name == "in_b" else [])):
        out = mmcv.imresize(src, (dw, dh), interpolation="bilinear")
        fn = f"resize_{name}_{k}.png"
        save_rgb(fn, out)
        resize_cases.append({"input": f"{name}.png", "w": dw, "h": dh, "output": fn})
    # mmcv.imrescale to the paper's scales
    for k, sc in enumerate([(150, 400), (240, 1333)] if name == "in_a" else [(200, 400), (57, 1333)]):
        out, f = mmcv.imrescale(src, sc, return_scale=True)
        fn = f"rescale_{name}_{k}.png"
        save_rgb(fn, out)
        resize_cases.append({"input": f"{name}.png", "w": out.shape[1], "h": out.shape[0], "output": fn,
                             "scale": list(sc)})
fx["resize"] = resize_cases
near = []
for k, (dw, dh) in enumerate([(130, 90), (40, 29), (97, 211), (13, 9)]):
    out = mmcv.imresize(in_lab, (dw, dh), interpolation="nearest")
    fn = f"nearest_{k}.png"
    save_gray(fn, out)
    near.append({"input": "in_lab.png", "w": dw, "h": dh, "output": fn})
fx["nearest"] = near
sizes = []
for (w, h) in [(640, 427), (500, 375), (427, 640), (1, 1000), (333, 333), (612, 612), (640, 480), (77, 1333)]:
    for sc in [(800, 1333), (480, 1333), (2048, 512), (1024, 256)]:
        (nw, nh) = mmcv.rescale_size((w, h), sc)
        sizes.append([w, h, sc[0], sc[1], nw, nh])
fx["rescale_size"] = sizes

# ---- HSV and photometric distortion (mmcv.bgr2hsv / hsv2bgr, mmseg 0.x) --------------------
hsv = mmcv.bgr2hsv(in_a)
save_rgb("hsv_in_a.png", hsv)  # channels H, S, V stored as "B, G, R" of the PNG
hsv2 = hsv.copy()
hsv2[:, :, 0] = (hsv2[:, :, 0].astype(int) + 17) % 180
hsv2[:, :, 1] = np.clip(hsv2[:, :, 1].astype(np.float32) * 1.3, 0, 255).astype(np.uint8)
save_rgb("hsv2bgr_in_a.png", mmcv.hsv2bgr(hsv2))


class Scripted:
    """Stand-in for numpy.random inside mmseg's transforms: returns scripted values."""

    def __init__(self, values):
        self.values = list(values)

    def randint(self, *a, **k):
        return self.values.pop(0)

    def uniform(self, *a, **k):
        return self.values.pop(0)


photo = []
for k, (mode, b, c, s, hd) in enumerate([(1, 20.5, 1.31, 0.72, 11), (0, -27.25, 0.63, 1.44, -18),
                                         (1, None, None, 1.2, None), (0, 3.0, 1.1, None, 5)]):
    vals = []
    vals += [1, b] if b is not None else [0]
    vals += [mode]
    if mode == 1:
        vals += [1, c] if c is not None else [0]
    vals += [1, s] if s is not None else [0]
    vals += [1, hd] if hd is not None else [0]
    if mode == 0:
        vals += [1, c] if c is not None else [0]
    mmseg_tf.random = Scripted(vals)
    res = mmseg_tf.PhotoMetricDistortion()({"img": in_a.copy()})
    fn = f"photo_{k}.png"
    save_rgb(fn, res["img"])
    photo.append({"mode": mode, "brightness": b, "contrast": c, "saturation": s, "hue": hd, "output": fn})
fx["photometric"] = photo

# ---- pycocotools rasterization of the coco-tiny annotations -------------------------------
rles = []
for a in ann.loadAnns(sorted(ann.getAnnIds())):
    m = ann.annToMask(a)
    r = mu.encode(np.asfortranarray(m))
    rles.append({"id": a["id"], "counts": r["counts"].decode(), "area": int(m.sum())})
fx["ann_masks"] = rles

# ---- Mask R-CNN targets: BitmapMasks / PolygonMasks.crop_and_resize ------------------------
cr = []
anns = [a for a in ann.loadAnns(sorted(ann.getAnnIds())) if not a["iscrowd"]][:40]
for a in anns:
    im = ann.loadImgs(a["image_id"])[0]
    h, w = im["height"], im["width"]
    x, y, bw, bh = a["bbox"]
    boxes = [[x, y, x + bw, y + bh]]
    for _ in range(2):
        j = rng.uniform(-0.3, 0.3, size=4) * np.array([bw, bh, bw, bh])
        boxes.append([x + j[0], y + j[1], x + bw + j[2], y + bh + j[3]])
    boxes.append([x - 20, y - 10, x + bw + 50, y + bh + 5])  # partly outside: clipped
    boxes = np.array(boxes, dtype=np.float32)
    maxh, maxw = h, w
    clipped = boxes.copy()
    clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], 0, maxw)
    clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], 0, maxh)
    inds = np.zeros(len(boxes), dtype=np.int64)
    bm = BitmapMasks([ann.annToMask(a)], h, w)
    pm = PolygonMasks([[np.array(p, dtype=np.float64) for p in a["segmentation"]]], h, w)
    tb = bm.crop_and_resize(clipped, (28, 28), inds, device="cpu").to_ndarray()
    tp = pm.crop_and_resize(clipped, (28, 28), inds, device="cpu").to_ndarray()
    cr.append({"id": a["id"], "boxes": boxes.tolist(),
               "bitmap": ["".join(map(str, t.reshape(-1).astype(int))) for t in tb],
               "polygon": ["".join(map(str, t.reshape(-1).astype(int))) for t in tp]})
fx["crop_and_resize"] = cr

# ---- an mmdet 2.x pipeline chain on in_a with two objects ----------------------------------
polys = [[[15.0, 20.0, 75.0, 17.5, 85.25, 80.0, 20.0, 85.0]],
         [[100.0, 50.0, 150.5, 60.0, 130.0, 115.0]]]
bboxes = np.array([[15, 17.5, 85.25, 85], [100, 50, 150.5, 115]], dtype=np.float32)
h, w = in_a.shape[:2]
results = {
    "img": in_a.copy(), "img_shape": in_a.shape, "ori_shape": in_a.shape,
    "gt_bboxes": bboxes.copy(), "gt_labels": np.array([3, 7]),
    "gt_bboxes_ignore": np.array([[5, 100, 30, 117]], dtype=np.float32),
    "gt_masks": BitmapMasks([mu.decode(mu.merge(mu.frPyObjects(p, h, w))) for p in polys], h, w),
    "bbox_fields": ["gt_bboxes", "gt_bboxes_ignore"], "mask_fields": ["gt_masks"], "seg_fields": [],
}
results = RandomFlip(flip_ratio=1.0)(results)
results = Resize(img_scale=[(200, 1333)], multiscale_mode="value", keep_ratio=True)(results)


class FixedCrop:
    def __init__(self):
        self.values = [150, 180, 20, 30]  # crop_h, crop_w, offset_h, offset_w

    def randint(self, *a, **k):
        return self.values.pop(0)


import mmdet.datasets.pipelines.transforms as mmdet_tf  # noqa: E402

orig_random = mmdet_tf.np.random
mmdet_tf.np.random = FixedCrop()
results = RandomCrop(crop_size=(100, 200), crop_type="absolute_range", allow_negative_crop=True)(results)
mmdet_tf.np.random = orig_random
results = Resize(img_scale=[(240, 1333)], multiscale_mode="value", keep_ratio=True, override=True)(results)
results = Pad(size_divisor=32)(results)
save_rgb("chain_out.png", results["img"])
fx["chain"] = {
    "input": "in_a.png", "polys": polys, "boxes": bboxes.tolist(), "labels": [3, 7],
    "ignore": [[5, 100, 30, 117]], "pre_scale": [200, 1333], "crop": [150, 180, 20, 30],
    "post_scale": [240, 1333],
    "out_boxes": results["gt_bboxes"].tolist(), "out_labels": results["gt_labels"].tolist(),
    "out_ignore": results["gt_bboxes_ignore"].tolist(),
    "img_shape": list(results["img_shape"][:2]), "pad_shape": list(results["pad_shape"][:2]),
    "scale_factor": results["scale_factor"].tolist(),
    "masks": [mu.encode(np.asfortranarray(m))["counts"].decode() for m in results["gt_masks"].masks],
    "mask_hw": [results["gt_masks"].height, results["gt_masks"].width],
}

# ---- JPEG decoding (cv2, orientation ignored) on coco-tiny ---------------------------------
dec = []
for iid in img_ids[:4]:
    im = ann.loadImgs(iid)[0]
    bgr = cv2.imread(os.path.join(COCO_DIR, "train2017", im["file_name"]),
                     cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    h, w = bgr.shape[:2]
    y0, x0 = h // 2 - 12, w // 2 - 12
    patch = bgr[y0:y0 + 24, x0:x0 + 24, ::-1]
    dec.append({"file": im["file_name"], "w": w, "h": h, "x0": x0, "y0": y0,
                "patch_rgb": patch.reshape(-1).tolist(),
                "mean_rgb": bgr[:, :, ::-1].reshape(-1, 3).mean(0).tolist()})
fx["jpeg"] = dec

with open(os.path.join(OUT, "reference.json"), "w") as f:
    json.dump(fx, f)
print("wrote", OUT, sorted(os.listdir(OUT)).__len__(), "files")
