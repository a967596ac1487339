"""Reference fixtures for the comparison backbones (Swin, ResNet/ResNeXt).

Weights are not stored: every parameter is filled from a counter-based hash (splitmix64 of
(stream << 40 | index)) mapped to a uniform value with a given mean and std, which the Rust tests
rebuild bit for bit from the recipe in the JSON file. That keeps full-size models (Swin-T,
ResNeXt-101 64x4d) testable with fixtures of a few hundred KB. Outputs come from the reference
implementations themselves:

  swin_tiny_cls     timm `swin_tiny_patch4_window7_224`, logits at 2x3x224x224 (timm names)
  swin_tiny_dense   mmdet 2.x `SwinTransformer` (Swin-T, out_indices 0..3), features at
                    1x3x100x164 -- padding to window multiples, odd-size patch merging
                    (mmdet names, unfold-ordered merging weights)
  resnet50, resnext101_32x4d, resnext101_64x4d
                    torchvision `ResNet` (Bottleneck), eval mode; logits and layer1..4
                    outputs at 1x3x32x64 (torchvision names)

Run: .venv/bin/python tools/reference/gen_swin_resnet.py  (writes backbone/tests/fixtures/swin_resnet)
"""
import json
import math
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "backbone", "tests", "fixtures", "swin_resnet")
SQRT3 = math.sqrt(3.0)


def hashed_uniform(n, stream):
    """u in [0, 1) with 24 bits, exactly reproducible in Rust (see backbone/tests/support)."""
    with np.errstate(over="ignore"):
        z = (np.uint64(stream) << np.uint64(40)) | np.arange(n, dtype=np.uint64)
        z = (z + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)


def hashed(shape, stream, mean, std):
    n = int(np.prod(shape)) if len(shape) else 1
    u = hashed_uniform(n, stream)
    v = (mean + (std * SQRT3) * (2.0 * u - 1.0)).astype(np.float32)
    return torch.from_numpy(v.reshape(shape))


def fill(model, recipe_of, skip=("relative_position_index", "num_batches_tracked", "attn_mask")):
    """Overwrite every state entry of `model` (state_dict order) and return the recipe list."""
    recipe = []
    sd = model.state_dict()
    new = {}
    for stream, (name, t) in enumerate(sd.items()):
        if any(s in name for s in skip):
            continue
        mean, std = recipe_of(name, t)
        new[name] = hashed(list(t.shape), stream, mean, std)
        recipe.append({"name": name, "shape": list(t.shape), "stream": stream, "mean": mean, "std": std})
    missing, unexpected = model.load_state_dict(new, strict=False)
    assert not unexpected, unexpected
    assert all(any(s in m for s in skip) for m in missing), missing
    return recipe


def swin_recipe(name, t):
    if name.endswith("relative_position_bias_table"):
        return 0.0, 0.5
    if t.dim() == 1 and name.endswith("weight"):  # LayerNorms
        return 1.0, 0.1
    if name.endswith("bias"):
        return 0.0, 0.05
    fan_in = t[0].numel()
    return 0.0, 1.0 / math.sqrt(fan_in)


def resnet_recipe(name, t):
    if name.endswith("running_var"):
        return 1.0, 0.2
    if name.endswith("running_mean"):
        return 0.0, 0.1
    if t.dim() == 1 and name.endswith("weight"):  # BatchNorm gamma; damp residual branches
        return (0.3 if name.endswith("bn3.weight") or name.endswith("downsample.1.weight") else 1.0), 0.1
    if name.endswith("bias"):
        return 0.0, 0.05
    fan_in = t[0].numel()
    return 0.0, 1.0 / math.sqrt(fan_in)


def write(case, recipe, inp, outputs, extra=None):
    meta = {"case": case, "input": inp, "params": recipe}
    meta.update(extra or {})
    with open(os.path.join(OUT, f"{case}.json"), "w") as f:
        json.dump(meta, f)
    save_file({k: v.detach().contiguous().float() for k, v in outputs.items()}, os.path.join(OUT, f"{case}.safetensors"))
    stats = ", ".join(f"{k}{list(v.shape)} max|.|={v.abs().max().item():.3g}" for k, v in outputs.items())
    print(f"{case}: {len(recipe)} tensors; {stats}")


def make_input(shape, stream):
    return hashed(shape, stream, 0.0, 1.0), {"shape": shape, "stream": stream, "mean": 0.0, "std": 1.0}


def swin_cls():
    import timm

    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    recipe = fill(m, swin_recipe)
    x, spec = make_input([2, 3, 224, 224], 1_000_000)
    with torch.no_grad():
        logits = m(x)
    write("swin_tiny_cls", recipe, spec, {"logits": logits}, {"reference": f"timm {timm.__version__} swin_tiny_patch4_window7_224"})


def swin_dense():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import mmcv_ext_shim

    mmcv_ext_shim.install()
    import mmdet
    from mmdet.models.backbones.swin import SwinTransformer

    m = SwinTransformer(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
                        out_indices=(0, 1, 2, 3), drop_path_rate=0.2)
    m.eval()  # mmdet's train() override returns None, so no chaining
    recipe = fill(m, swin_recipe)
    x, spec = make_input([1, 3, 100, 164], 1_000_001)
    with torch.no_grad():
        feats = m(x)
    write("swin_tiny_dense", recipe, spec, {f"feat{i}": f for i, f in enumerate(feats)},
          {"reference": f"mmdet {mmdet.__version__} SwinTransformer (Swin-T)"})


def resnets():
    import torchvision
    from torchvision.models.resnet import Bottleneck, ResNet

    cases = {
        "resnet50": dict(layers=[3, 4, 6, 3]),
        "resnext101_32x4d": dict(layers=[3, 4, 23, 3], groups=32, width_per_group=4),
        "resnext101_64x4d": dict(layers=[3, 4, 23, 3], groups=64, width_per_group=4),
    }
    for k, (case, kw) in enumerate(cases.items()):
        m = ResNet(Bottleneck, **kw).eval()
        recipe = fill(m, resnet_recipe)
        x, spec = make_input([1, 3, 32, 64], 1_000_010 + k)
        with torch.no_grad():
            y = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            feats = []
            for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
                y = layer(y)
                feats.append(y)
            logits = m(x)
        outs = {f"feat{i}": f for i, f in enumerate(feats)}
        outs["logits"] = logits
        write(case, recipe, spec, outs, {"reference": f"torchvision {torchvision.__version__} ResNet(Bottleneck, {kw})"})


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    torch.set_grad_enabled(False)
    swin_cls()
    swin_dense()
    resnets()
