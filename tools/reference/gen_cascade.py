"""Fixtures for cnx-heads' Cascade Mask R-CNN (mmdetection 2.28's own CascadeRCNN).

- cascade_names.json: state-dict names and shapes of the full-size ConvNeXt-T Cascade Mask R-CNN
  (the checkpoint layout the loader must accept).
- cascade_weights.safetensors + cascade_expected.safetensors + cascade_expected.json: a reduced
  ConvNeXt / FPN / heads with seeded random weights run on coco-tiny images: RPN proposals,
  detections and pasted masks (compressed RLE). Same images and preprocessing as
  gen_detection.py.
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_detection as gd  # noqa: E402  (installs the mmcv._ext shim)

OUT = os.path.join(gd.ROOT, "heads", "tests", "fixtures", "cascade")
DEPTHS, DIMS, C, FC, NCLS = [1, 1, 2, 1], [16, 32, 64, 128], 32, 64, 80
STDS = [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]]


def build_model(depths, dims, c, fc, train_cfg=None, drop_path_rate=0.0):
    import convnext_mmdet
    convnext_mmdet.register()
    from mmcv import ConfigDict
    from mmdet.models import build_detector
    roi = dict(type="RoIAlign", output_size=7, sampling_ratio=0)
    bbox_heads = [dict(type="ConvFCBBoxHead", num_shared_convs=4, num_shared_fcs=1, in_channels=c,
                       conv_out_channels=c, fc_out_channels=fc, roi_feat_size=7, num_classes=NCLS,
                       bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=s),
                       reg_class_agnostic=False, reg_decoded_bbox=True, norm_cfg=dict(type="BN", requires_grad=True),
                       loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                       loss_bbox=dict(type="GIoULoss", loss_weight=10.0)) for s in STDS]
    mask_head = dict(type="FCNMaskHead", num_convs=4, in_channels=c, conv_out_channels=c, num_classes=NCLS,
                     loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0))
    cfg = ConfigDict(
        type="CascadeRCNN",
        backbone=dict(type="ConvNeXtRef", depths=depths, dims=dims, layer_scale_init_value=1.0,
                      drop_path_rate=drop_path_rate),
        neck=dict(type="FPN", in_channels=dims, out_channels=c, num_outs=5),
        rpn_head=dict(type="RPNHead", in_channels=c, feat_channels=c,
                      anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0],
                                            strides=[4, 8, 16, 32, 64]),
                      bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
                      loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
                      loss_bbox=dict(type="SmoothL1Loss", beta=1.0 / 9.0, loss_weight=1.0)),
        roi_head=dict(type="CascadeRoIHead", num_stages=3, stage_loss_weights=[1, 0.5, 0.25],
                      bbox_roi_extractor=dict(type="SingleRoIExtractor", roi_layer=roi, out_channels=c,
                                              featmap_strides=[4, 8, 16, 32]),
                      bbox_head=bbox_heads,
                      mask_roi_extractor=dict(type="SingleRoIExtractor",
                                              roi_layer=dict(type="RoIAlign", output_size=14, sampling_ratio=0),
                                              out_channels=c, featmap_strides=[4, 8, 16, 32]),
                      mask_head=mask_head),
        train_cfg=train_cfg,
        test_cfg=dict(rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
                      rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100,
                                mask_thr_binary=0.5)))
    return build_detector(cfg)


def random_weights(model, seed=0):
    """gen_detection's scheme plus sane BatchNorm statistics for the box heads' ConvModules."""
    g = torch.Generator().manual_seed(seed + 7)
    sd = {}
    base = {k: v for k, v in gd.random_weights(model, seed).items()}
    for name, v in base.items():
        if ".bn." in name:
            n = v.shape[0]
            if name.endswith("running_var"):
                v = 0.5 + torch.rand(n, generator=g)
            elif name.endswith("running_mean"):
                v = 0.1 * torch.randn(n, generator=g)
            elif name.endswith("weight"):
                v = 1.0 + 0.1 * torch.randn(n, generator=g)
        sd[name] = v.contiguous()
    model.load_state_dict(sd, strict=False)
    return sd


def names():
    model = build_model([3, 3, 9, 3], [96, 192, 384, 768], 256, 1024)
    out = {k: list(v.shape) for k, v in model.state_dict().items()}
    with open(os.path.join(OUT, "cascade_names.json"), "w") as f:
        json.dump(out, f, indent=0, sort_keys=True)
    print("names:", len(out), "params:", sum(int(np.prod(v.shape)) for v in model.parameters()))


def network():
    import pycocotools.mask as mask_util
    torch.manual_seed(0)
    model = build_model(DEPTHS, DIMS, C, FC).eval()
    sd = random_weights(model)
    save_file(sd, os.path.join(OUT, "cascade_weights.safetensors"))
    imgs, metas, batch = gd.load_images()
    exp = {}
    info = {"images": [], "config": dict(depths=DEPTHS, dims=DIMS, fpn=C, fc=FC, num_classes=NCLS)}
    with torch.no_grad():
        x = model.extract_feat(batch)
        props = model.rpn_head.simple_test_rpn(x, metas)
        res = model.roi_head.simple_test(x, props, metas, rescale=True)
    for i, im in enumerate(imgs):
        bbox_res, segm_res = res[i]
        boxes, scores, labels, rles = [], [], [], []
        for l in range(NCLS):
            for k in range(bbox_res[l].shape[0]):
                boxes.append(bbox_res[l][k, :4])
                scores.append(bbox_res[l][k, 4])
                labels.append(l)
                m = segm_res[l][k]
                rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
                rles.append(rle["counts"].decode())
        exp[f"image_{i}"] = torch.from_numpy(np.ascontiguousarray(im))
        exp[f"proposals_{i}"] = props[i]
        exp[f"det_boxes_{i}"] = torch.from_numpy(np.array(boxes, dtype=np.float32).reshape(-1, 4))
        exp[f"det_scores_{i}"] = torch.from_numpy(np.array(scores, dtype=np.float32).reshape(-1))
        exp[f"det_labels_{i}"] = torch.tensor(labels, dtype=torch.int64)
        m = metas[i]
        info["images"].append(dict(file_name=m["file_name"], ori_shape=list(m["ori_shape"][:2]),
                                   img_shape=list(m["img_shape"][:2]), scale_factor=m["scale_factor"].tolist(),
                                   masks=rles))
        print(f"image {i}: {props[i].shape[0]} proposals, {len(labels)} detections")
    info["pad_shape"] = list(batch.shape[2:])
    save_file({k: v.contiguous().clone() for k, v in exp.items()}, os.path.join(OUT, "cascade_expected.safetensors"))
    with open(os.path.join(OUT, "cascade_expected.json"), "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    names()
    network()
    print("wrote", OUT)
