"""Fixtures for cnx-heads' Mask R-CNN blocks and the whole network.

- ops.safetensors: RoIAlign forward/backward, NMS, batched NMS, box IoU / GIoU
  (torchvision.ops); anchors and delta encode/decode (mmdet's AnchorGenerator and
  DeltaXYWHBBoxCoder).
- maskrcnn_weights.safetensors + maskrcnn_expected.safetensors + maskrcnn_expected.json:
  mmdetection 2.28's own Mask R-CNN (mmcv pure-Python build; compiled ops from torchvision via
  mmcv_ext_shim) with a reduced ConvNeXt, seeded random weights, run on coco-tiny images:
  RPN proposals, detections, and pasted masks (compressed RLE, pycocotools).
- mmdet_ckpt.pth: a torch.save'd mmdet-layout checkpoint ({"meta", "state_dict"}) of the same
  model, for the checkpoint loader tests.
"""
import json
import os
import sys

import numpy as np
import torch
import torchvision
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
OUT = os.path.join(ROOT, "heads", "tests", "fixtures", "detection")
DATA = os.path.join(ROOT, "tests", "data", "coco-tiny")
sys.path.insert(0, HERE)

import mmcv_ext_shim  # noqa: E402

mmcv_ext_shim.install()
import warnings  # noqa: E402

warnings.filterwarnings("ignore")
from mmdet.core.anchor import AnchorGenerator  # noqa: E402
from mmdet.core.bbox.coder import DeltaXYWHBBoxCoder  # noqa: E402


def ops():
    g = torch.Generator().manual_seed(0)
    t = {}
    # RoIAlign: features, RoIs with edge cases (outside, tiny, zero/negative size, huge).
    feat = torch.randn(2, 5, 23, 31, generator=g)
    r = []
    for i in range(40):
        x1 = float(torch.rand(1, generator=g)) * 40 - 5
        y1 = float(torch.rand(1, generator=g)) * 30 - 5
        w = float(torch.rand(1, generator=g)) * 60
        h = float(torch.rand(1, generator=g)) * 45
        r.append([i % 2, x1, y1, x1 + w, y1 + h])
    r += [[0, 3.0, 3.0, 3.0, 3.0], [1, 10.0, 5.0, 9.5, 4.0], [0, -20, -20, -15, -15], [1, 0, 0, 31, 23],
          [0, 29.7, 21.2, 45.0, 40.0], [1, 0.2, 0.3, 0.9, 0.8]]
    rois = torch.tensor(r, dtype=torch.float32)
    t["roi_feat"] = feat
    t["roi_rois"] = rois
    for name, size, scale, sr, aligned in [("a7", 7, 1.0, 0, True), ("a14h", 14, 0.5, 0, True),
                                           ("s2", 7, 1.0, 2, True), ("na", 7, 1.0, 0, False)]:
        f = feat.clone().requires_grad_(True)
        out = torchvision.ops.roi_align(f, rois, (size, size), scale, sr, aligned)
        gout = torch.randn(out.shape, generator=g)
        (out * gout).sum().backward()
        t[f"roi_{name}_out"] = out.detach()
        t[f"roi_{name}_gout"] = gout
        t[f"roi_{name}_grad"] = f.grad
    # NMS with ties and duplicates.
    n = 300
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 40 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = (torch.rand(n, generator=g) * 20).round() / 20  # many ties
    boxes[10] = boxes[3]
    scores[10] = scores[3]
    idxs = torch.randint(0, 5, (n,), generator=g)
    t["nms_boxes"] = boxes
    t["nms_scores"] = scores
    t["nms_idxs"] = idxs
    for thr in (0.3, 0.5, 0.7):
        k = str(thr).replace(".", "")
        t[f"nms_keep_{k}"] = torchvision.ops.nms(boxes, scores, thr)
        t[f"bnms_keep_{k}"] = torchvision.ops.batched_nms(boxes, scores, idxs, thr)
    t["iou"] = torchvision.ops.box_iou(boxes[:50], boxes[50:120])
    t["giou"] = torchvision.ops.generalized_box_iou(boxes[:50], boxes[50:120])
    # Anchors (mmdet v2 AnchorGenerator, center offset 0).
    ag = AnchorGenerator(strides=[4, 8, 16, 32, 64], ratios=[0.5, 1.0, 2.0], scales=[8])
    sizes = [(13, 17), (7, 9), (4, 5), (2, 3), (1, 2)]
    for l, a in enumerate(ag.grid_priors(sizes, device="cpu")):
        t[f"anchors_{l}"] = a
    for l, v in enumerate(ag.valid_flags(sizes, (45, 60), device="cpu")):
        t[f"valid_{l}"] = v.to(torch.uint8)
    # Delta coder.
    coder = DeltaXYWHBBoxCoder(target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2])
    props = boxes[:100]
    gts = boxes[100:200]
    t["coder_props"] = props
    t["coder_gts"] = gts
    t["coder_enc"] = coder.encode(props, gts)
    deltas = torch.randn(100, 4 * 3, generator=g) * 2
    deltas[0, 2] = 50.0  # clamp path
    t["coder_deltas"] = deltas
    t["coder_dec"] = coder.decode(props, deltas, max_shape=(90, 120))
    save_file({k: v.contiguous().clone() for k, v in t.items()}, os.path.join(OUT, "ops.safetensors"))


# ---------------------------------------------------------------- whole network
DEPTHS, DIMS, C, FC, NCLS = [1, 1, 2, 1], [16, 32, 64, 128], 64, 128, 80
SCALE = (533, 320)  # reduced test scale (long, short)
IMAGES = ["000000008193.jpg", "000000024577.jpg"]
MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def build_model(train_cfg=None, drop_path_rate=0.0):
    import convnext_mmdet
    convnext_mmdet.register()
    from mmcv import ConfigDict
    from mmdet.models import build_detector
    roi = dict(type="RoIAlign", output_size=7, sampling_ratio=0)
    cfg = ConfigDict(
        type="MaskRCNN",
        backbone=dict(type="ConvNeXtRef", depths=DEPTHS, dims=DIMS, layer_scale_init_value=1.0,
                      drop_path_rate=drop_path_rate),
        neck=dict(type="FPN", in_channels=DIMS, out_channels=C, num_outs=5),
        rpn_head=dict(type="RPNHead", in_channels=C, feat_channels=C,
                      anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0],
                                            strides=[4, 8, 16, 32, 64]),
                      bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
                      loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
                      loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        roi_head=dict(type="StandardRoIHead",
                      bbox_roi_extractor=dict(type="SingleRoIExtractor", roi_layer=roi, out_channels=C,
                                              featmap_strides=[4, 8, 16, 32]),
                      bbox_head=dict(type="Shared2FCBBoxHead", in_channels=C, fc_out_channels=FC, roi_feat_size=7,
                                     num_classes=NCLS,
                                     bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                                                     target_stds=[0.1, 0.1, 0.2, 0.2]),
                                     reg_class_agnostic=False,
                                     loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                                     loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
                      mask_roi_extractor=dict(type="SingleRoIExtractor",
                                              roi_layer=dict(type="RoIAlign", output_size=14, sampling_ratio=0),
                                              out_channels=C, featmap_strides=[4, 8, 16, 32]),
                      mask_head=dict(type="FCNMaskHead", num_convs=4, in_channels=C, conv_out_channels=C,
                                     num_classes=NCLS,
                                     loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0))),
        train_cfg=train_cfg,
        test_cfg=dict(rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
                      rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100,
                                mask_thr_binary=0.5)))
    return build_detector(cfg)


def random_weights(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        shape = p.shape
        if name.endswith("gamma"):
            v = 0.5 + 0.5 * torch.rand(shape, generator=g)
        elif "norm" in name and name.endswith("weight"):
            v = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            v = 0.05 * torch.randn(shape, generator=g)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            if "upsample" in name:  # ConvTranspose2d weight [cin, cout, k, k]
                fan_in = shape[0]
            std = 1.0 / np.sqrt(fan_in)
            if "fc_cls" in name:
                std *= 6.0  # peaked class scores so detections pass score_thr 0.05
            if "rpn_reg" in name or "fc_reg" in name:
                std *= 0.3
            v = std * torch.randn(shape, generator=g)
        if "rpn_cls.bias" in name:
            v = v - 2.0
        sd[name] = v.to(p.dtype).contiguous()
    model.load_state_dict(sd, strict=True)
    return sd


def load_images():
    import cv2
    import pycocotools.mask as mask_util  # noqa: F401
    imgs, metas = [], []
    for fn in IMAGES:
        bgr = cv2.imread(os.path.join(DATA, "train2017", fn), cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        h, w = rgb.shape[:2]
        f = min(SCALE[0] / max(h, w), SCALE[1] / min(h, w))
        nw, nh = int(w * f + 0.5), int(h * f + 0.5)
        res = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
        imgs.append(res)
        metas.append(dict(ori_shape=(h, w, 3), img_shape=(nh, nw, 3), pad_shape=None,
                          scale_factor=np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32), flip=False,
                          file_name=fn))
    ph = max(m["img_shape"][0] for m in metas)
    pw = max(m["img_shape"][1] for m in metas)
    ph, pw = (ph + 31) // 32 * 32, (pw + 31) // 32 * 32
    batch = torch.zeros(len(imgs), 3, ph, pw)
    for i, im in enumerate(imgs):
        x = (torch.from_numpy(im).float() - torch.from_numpy(MEAN)) / torch.from_numpy(STD)
        batch[i, :, :im.shape[0], :im.shape[1]] = x.permute(2, 0, 1)
        metas[i]["pad_shape"] = (ph, pw, 3)
        metas[i]["batch_input_shape"] = (ph, pw)
    return imgs, metas, batch


def network():
    import pycocotools.mask as mask_util
    torch.manual_seed(0)
    model = build_model().eval()
    sd = random_weights(model)
    save_file(sd, os.path.join(OUT, "maskrcnn_weights.safetensors"))
    torch.save({"meta": {"mmdet_version": "2.28.2", "CLASSES": None}, "state_dict": {k: v.half() for k, v in sd.items()}},
               os.path.join(OUT, "mmdet_ckpt.pth"))
    imgs, metas, batch = load_images()
    exp = {}
    info = {"images": [], "config": dict(depths=DEPTHS, dims=DIMS, fpn=C, fc=FC, num_classes=NCLS)}
    with torch.no_grad():
        x = model.extract_feat(batch)
        props = model.rpn_head.simple_test_rpn(x, metas)
        dets, labels = model.roi_head.simple_test_bboxes(x, metas, props, model.roi_head.test_cfg, rescale=True)
        segms = model.roi_head.simple_test_mask(x, metas, dets, labels, rescale=True)
    for i, im in enumerate(imgs):
        exp[f"image_{i}"] = torch.from_numpy(np.ascontiguousarray(im))
        exp[f"proposals_{i}"] = props[i]
        exp[f"det_boxes_{i}"] = dets[i][:, :4].contiguous()
        exp[f"det_scores_{i}"] = dets[i][:, 4].contiguous()
        exp[f"det_labels_{i}"] = labels[i]
        # per-detection masks from mmdet's per-class lists (det order within a class)
        seen = {}
        rles = []
        for l in labels[i].tolist():
            k = seen.get(l, 0)
            seen[l] = k + 1
            m = segms[i][l][k]
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            rles.append(rle["counts"].decode())
        m = metas[i]
        info["images"].append(dict(file_name=m["file_name"], ori_shape=list(m["ori_shape"][:2]),
                                   img_shape=list(m["img_shape"][:2]), scale_factor=m["scale_factor"].tolist(),
                                   masks=rles))
        print(f"image {i}: {props[i].shape[0]} proposals, {dets[i].shape[0]} detections")
    info["pad_shape"] = list(batch.shape[2:])
    save_file({k: v.contiguous().clone() for k, v in exp.items()}, os.path.join(OUT, "maskrcnn_expected.safetensors"))
    with open(os.path.join(OUT, "maskrcnn_expected.json"), "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    ops()
    network()
    print("wrote", OUT)
