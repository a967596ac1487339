"""Reference fixtures for ConvNeXt and the checkpoint reader (backbone crate).

The networks are built in PyTorch: timm's `ConvNeXt` (which matches the official classifier) and,
for the dense variant, the official dense formulation written out below from the paper's code
(per-stage outputs through a channels-first LayerNorm `norm{i}`). Weights are seeded random values
made non-trivial (layer-scale gamma uniform 0.5..1.5, LayerNorm weights/biases random, conv/linear
weights ~ 1/sqrt(fan_in)) so that every tensor matters for the outputs.

Written to <out>/ (default backbone/tests/fixtures/convnext, a reduced width/depth configuration
`mini`: dims 8,16,32,64, depths 1,1,2,1, 37 classes -- the same code path as the real variants):

  meta.json              config, cases, the PyTorch output shapes at other input sizes
  official.pth           torch.save({'model': official-named state dict, 'epoch', 'args': Namespace})
  timm.safetensors       timm-named state dict (safetensors)
  timm.pth               timm-named state dict (bare, torch.save)
  dense_mmdet.pth        mmdet-style whole-model checkpoint: {'meta': {...}, 'state_dict':
                         backbone.* (dense, with norm0..3) + a neck tensor}
  outputs.safetensors    `<case>.logits` (timm classifier) and `<case>.feat{i}` (official dense) for
                         each case; inputs are a closed-form pattern rebuilt by the Rust test
                         (see `input_pattern`)
  pickle/*.pth           pickle-reader cases: views with storage offsets and strides, all storage
                         dtypes, shared storages, scalars; a legacy-format file; a state dict with a
                         non-tensor object in a tensor position; expected values in
                         pickle/expected.safetensors

`--full NAME --out DIR` writes the same layout for a full-size variant (used by `make parity`).
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(ROOT, "backbone", "tests", "fixtures", "convnext")

VARIANTS = {
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnext_xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
    "mini": ((1, 1, 2, 1), (8, 16, 32, 64)),
}


# ---- the official dense ConvNeXt (object_detection/mmdet/models/backbones/convnext.py) ----
class LayerNorm(nn.Module):
    def __init__(self, normalized_shape, eps=1e-6, data_format="channels_last"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Block(nn.Module):
    def __init__(self, dim, layer_scale_init_value=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones((dim)))

    def forward(self, x):
        inp = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return inp + x


class DenseConvNeXt(nn.Module):
    def __init__(self, depths, dims, out_indices=(0, 1, 2, 3)):
        super().__init__()
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(
            nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm(dims[0], 1e-6, "channels_first"))
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(LayerNorm(dims[i], 1e-6, "channels_first"), nn.Conv2d(dims[i], dims[i + 1], 2, 2))
            )
        self.stages = nn.ModuleList([nn.Sequential(*[Block(dims[i]) for _ in range(depths[i])]) for i in range(4)])
        self.out_indices = out_indices
        for i in out_indices:
            self.add_module(f"norm{i}", LayerNorm(dims[i], 1e-6, "channels_first"))

    def forward(self, x):
        outs = []
        for i in range(4):
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(x))
        return outs


# ---- name mapping timm -> official ----
def timm_to_official(k):
    p = k.split(".")
    if p[0] == "stem":
        return ".".join(["downsample_layers", "0", p[1]] + p[2:])
    if p[0] == "stages" and p[2] == "downsample":
        return ".".join(["downsample_layers", p[1], p[3]] + p[4:])
    if p[0] == "stages" and p[2] == "blocks":
        rest = p[4:]
        if rest[0] == "conv_dw":
            rest = ["dwconv"] + rest[1:]
        elif rest[:2] == ["mlp", "fc1"]:
            rest = ["pwconv1"] + rest[2:]
        elif rest[:2] == ["mlp", "fc2"]:
            rest = ["pwconv2"] + rest[2:]
        return ".".join(["stages", p[1], p[3]] + rest)
    if p[:2] == ["head", "norm"]:
        return ".".join(["norm"] + p[2:])
    if p[:2] == ["head", "fc"]:
        return ".".join(["head"] + p[2:])
    return k


def randomize(model, gen):
    """Non-trivial seeded weights: every parameter influences the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif p.dim() == 1 and ("norm" in name or name.startswith("stem.1") or "downsample.0" in name):
                if name.endswith("weight"):
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
                else:
                    p.copy_((torch.rand(p.shape, generator=gen) - 0.5) * 0.4)
            elif p.dim() == 1:
                p.copy_((torch.rand(p.shape, generator=gen) - 0.5) * 0.2)
            else:
                fan_in = p[0].numel()
                std = 1.0 / math.sqrt(fan_in)
                if name.startswith("head.fc"):
                    std *= 0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def input_pattern(n, h, w):
    """x[b,c,y,x] = sin(0.37*y + 0.11*(c+1)*x + 1.3*b + 0.5*c), computed in float64 then cast."""
    b = np.arange(n, dtype=np.float64)[:, None, None, None]
    c = np.arange(3, dtype=np.float64)[None, :, None, None]
    y = np.arange(h, dtype=np.float64)[None, None, :, None]
    x = np.arange(w, dtype=np.float64)[None, None, None, :]
    v = np.sin(0.37 * y + 0.11 * (c + 1.0) * x + 1.3 * b + 0.5 * c)
    return torch.from_numpy(v.astype(np.float32))


def gen_model(name, out, num_classes, cases, seed, write_timm_pth=True):
    import timm.models.convnext as tc

    depths, dims = VARIANTS[name]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = tc.ConvNeXt(depths=depths, dims=dims, num_classes=num_classes, ls_init_value=1.0).eval()
    randomize(model, gen)
    timm_sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    official = {timm_to_official(k): v for k, v in timm_sd.items()}

    dense = DenseConvNeXt(depths, dims).eval()
    dense_sd = {k: v for k, v in official.items() if not (k.startswith("norm.") or k.startswith("head."))}
    for i in range(4):
        dense_sd[f"norm{i}.weight"] = torch.rand(dims[i], generator=gen) + 0.5
        dense_sd[f"norm{i}.bias"] = (torch.rand(dims[i], generator=gen) - 0.5) * 0.4
    missing, unexpected = dense.load_state_dict(dense_sd, strict=True)
    assert not missing and not unexpected

    torch.save(
        {"model": official, "epoch": 7, "args": argparse.Namespace(model=name, lr=4e-3, drop_path=0.1)},
        os.path.join(out, "official.pth"),
    )
    save_file(timm_sd, os.path.join(out, "timm.safetensors"))
    if write_timm_pth:
        torch.save(timm_sd, os.path.join(out, "timm.pth"))
    mm = {"backbone." + k: v for k, v in dense_sd.items()}
    mm["neck.lateral_convs.0.conv.weight"] = torch.randn(8, dims[0], 1, 1, generator=gen)
    mm["backbone.dummy_bn.num_batches_tracked"] = torch.tensor(5)
    meta = {
        "mmdet_version": "2.11.0",
        "CLASSES": ("person", "bicycle"),
        "config": "model = dict(type='MaskRCNN')",
        "epoch": 36,
        "hook_msgs": {"last_ckpt": "/x/epoch_36.pth"},
        "args": argparse.Namespace(seed=0),
    }
    torch.save({"meta": meta, "state_dict": mm, "optimizer": {"state": {}, "param_groups": []}},
               os.path.join(out, "dense_mmdet.pth"))

    outputs = {}
    with torch.no_grad():
        for case in cases:
            n, h, w = case["batch"], case["h"], case["w"]
            x = input_pattern(n, h, w)
            outputs[f"{case['name']}.logits"] = model(x).contiguous()
            for i, f in enumerate(dense(x)):
                outputs[f"{case['name']}.feat{i}"] = f.contiguous()
        shapes = {}
        for h, w in [(32, 32), (33, 47), (320, 448)]:
            shapes[f"{h}x{w}"] = [list(f.shape) for f in dense(input_pattern(1, h, w))]
    save_file(outputs, os.path.join(out, "outputs.safetensors"))
    meta = {
        "model": name,
        "depths": list(depths),
        "dims": list(dims),
        "num_classes": num_classes,
        "cases": cases,
        "dense_shapes": shapes,
        "params_classifier": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "timm": __import__("timm").__version__,
    }
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out} ({name}, {len(outputs)} outputs)")


def gen_pickle_cases(out):
    """Tensors the pickle reader must rebuild exactly, including views into shared storages."""
    d = os.path.join(out, "pickle")
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 6, generator=g)
    cases = {
        "row_slice": base[1:3],  # storage offset 6
        "transposed": base.t(),  # strides (1, 6)
        "column": base[:, 2],  # offset 2, stride 6
        "strided": base[::2, 1::3],
        "whole": base,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "half": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "double": torch.randn(3, generator=g).double(),
        "int64": torch.tensor([1, -2, 3_000_000_000]),
        "int32": torch.tensor([7, -8], dtype=torch.int32),
        "int16": torch.tensor([300, -301], dtype=torch.int16),
        "int8": torch.tensor([-5, 6], dtype=torch.int8),
        "uint8": torch.tensor([250, 1], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "param": nn.Parameter(torch.randn(2, 2, generator=g)),
        "channels_last": torch.randn(1, 3, 2, 2, generator=g).contiguous(memory_format=torch.channels_last),
    }
    sd = dict(cases)
    torch.save(sd, os.path.join(d, "views.pth"))
    save_file({k: v.detach().clone().contiguous() for k, v in cases.items()}, os.path.join(d, "expected.safetensors"))
    torch.save({"w": torch.ones(2), "bad": argparse.Namespace(x=1)}, os.path.join(d, "bad_entry.pth"))
    torch.save({"w": torch.ones(2)}, os.path.join(d, "legacy.pth"), _use_new_zipfile_serialization=False)
    print(f"wrote {d}")


def gen_preprocess_cases():
    """timm's evaluation transform (PIL bicubic resize + center crop), before ToTensor, for the
    `cnx classify` preprocessing test (tests/fixtures/classify)."""
    from PIL import Image
    from timm.data import create_transform

    d = os.path.join(ROOT, "tests", "fixtures", "classify")
    os.makedirs(d, exist_ok=True)
    # A lossless synthetic image (PNG: decoding is exact on both sides), non-square.
    h, w = 211, 300
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127.5 + 127.5 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    g = (xx * 255.0 / w)
    b = np.where(((xx // 25) + (yy // 25)) % 2 == 0, 230.0, 20.0)
    img = Image.fromarray(np.stack([r, g, b], -1).round().clip(0, 255).astype(np.uint8))
    img.save(os.path.join(d, "synthetic.png"))
    out = {}
    for name, size, crop_pct in [("s224_c0875", 224, 0.875), ("s160_c0950", 160, 0.95)]:
        t = create_transform(size, crop_pct=crop_pct, interpolation="bicubic", is_training=False)
        pil_steps = [s_ for s_ in t.transforms if type(s_).__name__ not in ("ToTensor", "MaybeToTensor", "Normalize")]
        x = img
        for s_ in pil_steps:
            x = s_(x)
        out[name] = torch.from_numpy(np.asarray(x).copy())
        out[name + ".normalized_corner"] = t(img)[:, :4, :4].contiguous()
    save_file(out, os.path.join(d, "synthetic_expected.safetensors"))
    print(f"wrote {d}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", help="full-size variant name (e.g. convnext_tiny) instead of the mini fixtures")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.full:
        out = a.out or os.path.join(ROOT, "tools", "reference", ".cache", f"parity_{a.full}")
        cases = [{"name": "s224", "batch": 2, "h": 224, "w": 224}, {"name": "s320x448", "batch": 1, "h": 320, "w": 448}]
        gen_model(a.full, out, 1000, cases, seed=11, write_timm_pth=False)
        return
    out = a.out or DEFAULT_OUT
    cases = [{"name": "s224", "batch": 2, "h": 224, "w": 224}, {"name": "s320x448", "batch": 1, "h": 320, "w": 448}]
    gen_model("mini", out, 37, cases, seed=7)
    gen_pickle_cases(out)
    gen_preprocess_cases()


if __name__ == "__main__":
    sys.exit(main())
