"""Fixture: the optimizer settings the Swin comparison rows' configs give every trainable
parameter (cnx `config groups` tests, src/cmd/config.rs).

The Swin repositories' detection / segmentation configs use mmcv's DefaultOptimizerConstructor
with paramwise_cfg custom_keys {absolute_pos_embed, relative_position_bias_table, norm} at
decay_mult 0 and no layer-wise decay; the same optimizer is used for the ResNet/ResNeXt rows
(biases and other 1-D parameters are decayed unless a key matches).
This script builds the whole models with mmdet 2.28 / mmseg 0.30 (their SwinTransformer,
ResNet, ResNeXt, FPN, RPN, Cascade 4conv1fc heads, UperNet + FCN aux head), applies mmcv's own
constructor and writes, per preset, {name: [lr_scale, weight_decay]} of every parameter with
requires_grad (and its shape). Names are mmdet's (Swin: `stages.i.blocks.j.attn.w_msa...`); the test maps the
backbone names to the official Swin layout cnx uses.

Output: tests/fixtures/layer-decay/swin_rule/<preset>.json: {name: [lr_scale, weight_decay, shape]}
"""
import copy
import json
import os
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "layer-decay", "swin_rule")
sys.path.insert(0, HERE)

import mmcv_ext_shim  # noqa: E402

mmcv_ext_shim.install()
warnings.filterwarnings("ignore")
from mmcv import ConfigDict  # noqa: E402
from mmcv.runner import DefaultOptimizerConstructor  # noqa: E402
import mmcv.runner.optimizer.default_constructor as _dc  # noqa: E402

# The constructor probes mmcv._ext for deformable convs (none here); the ops shim has no spec.
_dc.check_ops_exist = lambda: False

CUSTOM_KEYS = {
    "absolute_pos_embed": dict(decay_mult=0.0),
    "relative_position_bias_table": dict(decay_mult=0.0),
    "norm": dict(decay_mult=0.0),
}

SWIN_T = dict(type="SwinTransformer", embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
              window_size=7, mlp_ratio=4, qkv_bias=True, drop_path_rate=0.2, patch_norm=True,
              out_indices=(0, 1, 2, 3), with_cp=False, convert_weights=False)
R50 = dict(type="ResNet", depth=50, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1,
           norm_cfg=dict(type="BN", requires_grad=True), norm_eval=True, style="pytorch")
X101_32 = dict(type="ResNeXt", depth=101, groups=32, base_width=4, num_stages=4,
               out_indices=(0, 1, 2, 3), frozen_stages=1,
               norm_cfg=dict(type="BN", requires_grad=True), norm_eval=True, style="pytorch")


def mmdet_base(name):
    from mmcv import Config
    import mmdet
    base = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "_base_", "models", name)
    return Config.fromfile(base).model


def cascade(backbone, in_channels):
    m = mmdet_base("cascade_mask_rcnn_r50_fpn.py")
    m.backbone = ConfigDict(backbone)
    m.neck.in_channels = in_channels
    heads = []
    for h in m.roi_head.bbox_head:
        h = copy.deepcopy(h)
        h.type = "ConvFCBBoxHead"
        h.num_shared_convs = 4
        h.num_shared_fcs = 1
        h.fc_out_channels = 1024
        h.conv_out_channels = 256
        h.norm_cfg = dict(type="SyncBN", requires_grad=True)
        h.reg_decoded_bbox = True
        h.loss_bbox = dict(type="GIoULoss", loss_weight=10.0)
        heads.append(h)
    m.roi_head.bbox_head = heads
    return m


def mask_rcnn(backbone, in_channels):
    m = mmdet_base("mask_rcnn_r50_fpn.py")
    m.backbone = ConfigDict(backbone)
    m.neck.in_channels = in_channels
    return m


def upernet_swin():
    from mmcv import Config
    import mmseg
    base = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", "_base_", "models",
                        "upernet_swin.py")
    m = Config.fromfile(base).model
    m.pretrained = None
    m.backbone.update(embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                      drop_path_rate=0.3, patch_norm=True)
    m.backbone.pop("init_cfg", None)
    m.decode_head.in_channels = [96, 192, 384, 768]
    m.decode_head.num_classes = 150
    m.auxiliary_head.in_channels = 384
    m.auxiliary_head.num_classes = 150
    return m


def groups(model, lr, wd):
    ctor = DefaultOptimizerConstructor(
        dict(type="AdamW", lr=lr, betas=(0.9, 0.999), weight_decay=wd),
        dict(custom_keys=CUSTOM_KEYS),
    )
    params = []
    ctor.add_params(params, model)
    name_of = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in params:
        (p,) = g["params"]
        if not p.requires_grad:
            continue
        out[name_of[id(p)]] = [g.get("lr", lr) / lr, g.get("weight_decay", wd), list(p.shape)]
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    from mmdet.models import build_detector
    from mmseg.models import build_segmentor

    det = {
        "mask_rcnn_swin_tiny_3x": mask_rcnn(SWIN_T, [96, 192, 384, 768]),
        "cascade_mask_rcnn_swin_tiny_3x": cascade(SWIN_T, [96, 192, 384, 768]),
        "cascade_mask_rcnn_r50_3x": cascade(R50, [256, 512, 1024, 2048]),
        "cascade_mask_rcnn_x101_32x4d_3x": cascade(X101_32, [256, 512, 1024, 2048]),
    }
    for name, cfg in det.items():
        torch.manual_seed(0)
        model = build_detector(cfg)
        g = groups(model, 1e-4, 0.05)
        write(name, "detection: AdamW lr 1e-4, weight decay 0.05", 1e-4, g)
    torch.manual_seed(0)
    model = build_segmentor(upernet_swin())
    write("upernet_swin_tiny_512_160k", "segmentation: AdamW lr 6e-5, weight decay 0.01", 6e-5,
          groups(model, 6e-5, 0.01))


def write(name, what, lr, g):
    """One preset's file."""
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump({"preset": name, "optimizer": what, "lr": lr, "custom_keys": list(CUSTOM_KEYS),
                   "params": g}, f, indent=0)
    nd = sum(1 for v in g.values() if v[1] == 0.0)
    print(f"{name}: {len(g)} trainable parameters, {nd} without weight decay")


if __name__ == "__main__":
    main()
