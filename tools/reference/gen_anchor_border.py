"""Fixture for the RPN's border rule (cnx-heads tests/rpn_border.rs).

mmdet 2.28's AnchorHead keeps an anchor for target assignment when its cell lies inside the
image's own padded shape (`AnchorGenerator.valid_flags` on `pad_shape`) and, with
`train_cfg.rpn.allowed_border >= 0`, when it also lies inside the unpadded image widened by the
border (`anchor_inside_flags` on `img_shape`). Mask R-CNN's config has allowed_border = -1 (keep
all valid anchors); Cascade's has 0. Two images of different sizes share one padded batch.

Output: heads/tests/fixtures/anchor_border/anchor_border.safetensors with the batch's anchors,
and for image i and border b in (-1, 0, 8): valid_{i} and inside_{i}_{b} as uint8.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
OUT = os.path.join(ROOT, "heads", "tests", "fixtures", "anchor_border")
sys.path.insert(0, HERE)

import mmcv_ext_shim  # noqa: E402

mmcv_ext_shim.install()
import warnings  # noqa: E402

warnings.filterwarnings("ignore")
from mmdet.core.anchor import AnchorGenerator, anchor_inside_flags  # noqa: E402

# (img_shape, pad_shape) of each image; the batch is padded to the largest pad_shape.
IMAGES = [((45, 60), (64, 64)), ((70, 50), (96, 64))]
BORDERS = [-1, 0, 8]


def main():
    os.makedirs(OUT, exist_ok=True)
    ag = AnchorGenerator(strides=[4, 8, 16, 32, 64], ratios=[0.5, 1.0, 2.0], scales=[8])
    batch_h = max(p[0] for _, p in IMAGES)
    batch_w = max(p[1] for _, p in IMAGES)
    # mmdet strides are (w, h) pairs; the levels here are square.
    sizes = [(-(-batch_h // s[1]), -(-batch_w // s[0])) for s in ag.strides]
    anchors = torch.cat(ag.grid_priors(sizes, device="cpu"), 0)
    t = {"anchors": anchors}
    for i, (img, pad) in enumerate(IMAGES):
        valid = torch.cat(ag.valid_flags(sizes, pad, device="cpu"), 0)
        t[f"valid_{i}"] = valid.to(torch.uint8)
        for b in BORDERS:
            inside = anchor_inside_flags(anchors, valid, img, allowed_border=b)
            t[f"inside_{i}_{'m1' if b < 0 else b}"] = inside.to(torch.uint8)
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(OUT, "anchor_border.safetensors"))
    with open(os.path.join(OUT, "anchor_border.json"), "w") as f:
        json.dump(
            {
                "images": [{"img_shape": list(a), "pad_shape": list(b)} for a, b in IMAGES],
                "feature_sizes": [list(s) for s in sizes],
                "borders": BORDERS,
            },
            f,
            indent=1,
        )
    print("anchor_border: anchors", tuple(anchors.shape), "sizes", sizes)


if __name__ == "__main__":
    main()
