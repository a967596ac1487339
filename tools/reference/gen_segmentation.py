"""Reference fixtures for UperNet + ConvNeXt semantic segmentation (heads/tests/segmentation.rs).

mmsegmentation 0.30's own EncoderDecoder / UPerHead / FCNHead, with a ConvNeXt dense backbone
written from docs (shared/spec/models.md, official code layout) registered in mmseg's BACKBONES,
runs a reduced-width network with random weights (BN in eval mode with non-trivial running stats)
on the real ADE20K sample images, in the three test modes:

  * whole-image and sliding-window logits, rescaled to the original size (no softmax);
  * multi-scale + flip (mmseg aug_test): softmax scores averaged at the original size.

Written under heads/tests/fixtures/segmentation/:
  model.pth            the random weights as an mmseg checkpoint ({'meta', 'state_dict'})
  config.json          the reduced configuration (our SegmentorConfig field names)
  <stem>.png           each sample image as cv2 decodes it (lossless: JPEG decoders differ by a
                       few levels, and the test pipeline, not the JPEG decoder, is under test)
  outputs.safetensors  per image and mode: logits / scores on a strided pixel grid, and
                       per-class sums over every pixel (float64)
  losses.json          forward_train losses (train-mode BN) on a 2-image batch
  names_tiny.json      names and shapes of the full upernet_convnext_tiny_512_160k state dict

Run: .venv/bin/python tools/reference/gen_segmentation.py
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mmseg_shim  # noqa: E402,F401  (before mmseg)

import cv2  # noqa: E402
import mmcv  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mmseg.models import BACKBONES, build_segmentor  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ADE = os.path.join(ROOT, "tests", "data", "ade-sample")
OUT = os.path.join(ROOT, "heads", "tests", "fixtures", "segmentation")
GRID = (3, 7)  # outputs are stored at pixels [3::7, 3::7]


# ---------------------------------------------------------------- ConvNeXt (official layout)
class LayerNorm(nn.Module):
    def __init__(self, dim, eps=1e-6, data_format="channels_last"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.data_format = data_format
        self.dim = (dim,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.dim, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Block(nn.Module):
    def __init__(self, dim, drop_path=0.0, layer_scale_init_value=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = drop_path

    def forward(self, x):
        inp = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        if self.training and self.drop_path > 0:
            # Stochastic depth per sample (timm's DropPath, as the official code).
            keep = 1.0 - self.drop_path
            x = x * x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep).div_(keep)
        return inp + x


@BACKBONES.register_module()
class ConvNeXtRef(nn.Module):
    def __init__(self, in_chans=3, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), drop_path_rate=0.0,
                 layer_scale_init_value=1e-6, out_indices=(0, 1, 2, 3)):
        super().__init__()
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
            LayerNorm(dims[0], eps=1e-6, data_format="channels_first")))
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
                nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        self.stages = nn.ModuleList()
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        for i in range(4):
            first = sum(depths[:i])
            self.stages.append(nn.Sequential(*[Block(dims[i], rates[first + j], layer_scale_init_value)
                                               for j in range(depths[i])]))
        self.out_indices = out_indices
        for i in out_indices:
            self.add_module(f"norm{i}", LayerNorm(dims[i], eps=1e-6, data_format="channels_first"))

    def init_weights(self):
        pass

    def forward(self, x):
        outs = []
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(x))
        return tuple(outs)


# ---------------------------------------------------------------- configs
def model_cfg(depths, dims, channels, aux_channels, num_classes, test_cfg, dropout=0.1, layer_scale=1.0,
              drop_path_rate=0.0):
    norm_cfg = dict(type="BN", requires_grad=True)
    return mmcv.ConfigDict(dict(
        type="EncoderDecoder",
        pretrained=None,
        backbone=dict(type="ConvNeXtRef", in_chans=3, depths=depths, dims=dims, drop_path_rate=drop_path_rate,
                      layer_scale_init_value=layer_scale, out_indices=[0, 1, 2, 3]),
        decode_head=dict(type="UPerHead", in_channels=list(dims), in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                         channels=channels, dropout_ratio=dropout, num_classes=num_classes, norm_cfg=norm_cfg,
                         align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        auxiliary_head=dict(type="FCNHead", in_channels=dims[2], in_index=2, channels=aux_channels, num_convs=1,
                            concat_input=False, dropout_ratio=dropout, num_classes=num_classes,
                            norm_cfg=norm_cfg, align_corners=False,
                            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4)),
        train_cfg=dict(),
        test_cfg=test_cfg))


DEPTHS, DIMS, CH, AUX_CH, NCLS = [1, 1, 2, 1], [16, 32, 64, 128], 32, 16, 8
IMG_SCALE = (256, 128)
CROP, STRIDE = (96, 96), (64, 64)
RATIOS = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


def randomize(model, gen):
    """Random weights everywhere, BN with non-trivial running statistics, layer scale ~1."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) * 1.5 + 0.5)
            elif name.endswith("gamma"):
                t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + 0.75)
            elif t.dim() == 1:  # LN / BN affine and biases
                is_scale = name.endswith("weight")
                t.copy_((1.0 if is_scale else 0.0) + torch.randn(t.shape, generator=gen) * 0.1)
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=gen) * (1.0 / fan_in) ** 0.5)


def normalize(rgb_u8):
    x = (rgb_u8.astype(np.float32) - MEAN.astype(np.float32)) / STD.astype(np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


def meta(ori, shape, flip):
    return [dict(ori_shape=ori, img_shape=shape, pad_shape=shape, flip=flip, flip_direction="horizontal")]


def grid(t):
    return t[0, :, GRID[0]::GRID[1], GRID[0]::GRID[1]].numpy().astype(np.float32)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(20260)
    test_cfg = dict(mode="whole", crop_size=CROP, stride=STRIDE)
    cfg = model_cfg(DEPTHS, DIMS, CH, AUX_CH, NCLS, test_cfg, dropout=0.0)
    model = build_segmentor(cfg)
    randomize(model, gen)
    model.eval()
    sd = model.state_dict()
    torch.save({"meta": {"mmseg_version": "0.30.0", "CLASSES": [f"c{i}" for i in range(NCLS)]},
                "state_dict": sd}, os.path.join(OUT, "model.pth"))

    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(dict(depths=DEPTHS, dims=DIMS, channels=CH, aux_channels=AUX_CH, num_classes=NCLS,
                       img_scale=IMG_SCALE, crop_size=CROP, stride=STRIDE, ratios=RATIOS, grid=GRID), f, indent=1)

    names = sorted(os.listdir(os.path.join(ADE, "images", "validation")))
    outputs = {}
    for n in names:
        stem = os.path.splitext(n)[0]
        bgr = mmcv.imread(os.path.join(ADE, "images", "validation", n))
        cv2.imwrite(os.path.join(OUT, stem + ".png"), bgr, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        ori = bgr.shape
        outputs[f"{stem}/ori_hw"] = np.array(ori[:2], dtype=np.int64)
        scaled = []
        for r in RATIOS:
            scale = (int(IMG_SCALE[0] * r), int(IMG_SCALE[1] * r))
            img = mmcv.imrescale(bgr, scale, interpolation="bilinear", backend="cv2")
            scaled.append(np.ascontiguousarray(img[..., ::-1]))
        ss = scaled[RATIOS.index(1.0)]
        x = normalize(ss)
        with torch.no_grad():
            m = meta(ori, ss.shape, False)
            whole = model.whole_inference(x, m, rescale=True)
            model.test_cfg.mode = "slide"
            slide = model.slide_inference(x, m, rescale=True)
            model.test_cfg.mode = "whole"
            imgs, metas = [], []
            for rgb in scaled:
                for flip in (False, True):
                    xi = normalize(rgb[:, ::-1] if flip else rgb)
                    imgs.append(xi)
                    metas.append(meta(ori, rgb.shape, flip))
            aug = torch.from_numpy(model.aug_test_logits(imgs, metas, rescale=True))
        for mode, t in (("whole", whole), ("slide", slide), ("aug", aug)):
            outputs[f"{stem}/{mode}/grid"] = grid(t)
            outputs[f"{stem}/{mode}/class_sum"] = t[0].double().sum((1, 2)).numpy()
            print(stem, mode, tuple(t.shape), float(t.abs().max()))
    save_file(outputs, os.path.join(OUT, "outputs.safetensors"))

    # forward_train on a 2-image batch of 96x96 crops of the original images (train-mode BN).
    xs, ys = [], []
    for n in names[:2]:
        stem = os.path.splitext(n)[0]
        rgb = mmcv.imread(os.path.join(ADE, "images", "validation", n))[..., ::-1]
        lab = mmcv.imread(os.path.join(ADE, "annotations", "validation", stem + ".png"), flag="unchanged")
        lab = lab.astype(np.int64)
        lab = np.where(lab == 0, 255, (lab - 1) % NCLS)  # reduce_zero_label, folded to NCLS classes
        xs.append(normalize(np.ascontiguousarray(rgb[100:196, 200:296])))
        ys.append(torch.from_numpy(lab[100:196, 200:296].copy())[None])
    img = torch.cat(xs)
    lab = torch.stack(ys)
    model.train()
    losses = model.forward_train(img, [{}] * 2, lab)
    losses = {k: float(v) for k, v in losses.items()}
    print(losses)
    save_file({"image": img.numpy(), "label": lab[:, 0].numpy().astype(np.uint8)},
              os.path.join(OUT, "train_batch.safetensors"))
    with open(os.path.join(OUT, "losses.json"), "w") as f:
        json.dump(losses, f, indent=1)

    # Names and shapes of the full-size preset (150 classes, tiny backbone).
    full = build_segmentor(model_cfg([3, 3, 9, 3], [96, 192, 384, 768], 512, 256, 150,
                                     dict(mode="whole")))
    shapes = {k: list(v.shape) for k, v in full.state_dict().items()}
    n_params = sum(p.numel() for p in full.parameters())
    with open(os.path.join(OUT, "names_tiny.json"), "w") as f:
        json.dump({"params": n_params, "shapes": shapes}, f, indent=0)
    print("full tiny params", n_params)


if __name__ == "__main__":
    main()
