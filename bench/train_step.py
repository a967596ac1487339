"""bench/train_step.sh: one training step (forward + backward + AdamW) of the ConvNeXt-T presets on
CPU, cnx (`cnx benchmark PRESET --train --json`, a child process per round) against the PyTorch
reference a user would otherwise train with (mmdetection 2.28 MaskRCNN / CascadeRCNN, mmsegmentation
0.30 EncoderDecoder with UPerHead + FCNHead), in this process: same architecture (the presets'
stochastic depth 0.4 included), same batch and input shapes, synthetic inputs, random weights, same
threads. The two alternate round by round so a change in machine load hits both alike; each side
runs its warm-up step untimed. Prints per-phase milliseconds and the ratio cnx / reference.

Usage: train_step.py CNX THREADS ROUNDS STEPS ARCH... (ARCH: mask_rcnn, cascade, upernet)."""
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools", "reference"))
import gen_detection as gd  # noqa: E402  (installs the mmcv._ext shim: RoIAlign forward/backward, NMS)
import gen_cascade as gc  # noqa: E402

BATCH = 2
DROP_PATH = 0.4  # the ConvNeXt-T presets' stochastic depth (detection and segmentation)
DET_IMG, DET_PAD = (800, 1067), (800, 1088)  # a COCO image at (1333, 800), padded to 32
SEG_CROP = (512, 512)
PRESETS = {
    "mask_rcnn": "mask_rcnn_convnext_tiny_3x",
    "cascade": "cascade_mask_rcnn_convnext_tiny_3x",
    "upernet": "upernet_convnext_tiny_512_160k",
}
NAMES = {"mask_rcnn": "Mask R-CNN", "cascade": "Cascade Mask R-CNN", "upernet": "UperNet"}


def rpn_train_cfg():
    return dict(
        assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                      match_low_quality=True, ignore_iof_thr=-1),
        sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=False),
        allowed_border=-1, pos_weight=-1, debug=False)


def rcnn_train_cfg(iou, low_quality):
    return dict(
        assigner=dict(type="MaxIoUAssigner", pos_iou_thr=iou, neg_iou_thr=iou, min_pos_iou=iou,
                      match_low_quality=low_quality, ignore_iof_thr=-1),
        sampler=dict(type="RandomSampler", num=512, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True),
        mask_size=28, pos_weight=-1, debug=False)


def reference(arch):
    """The reference network in train mode (mmdet/mmseg's own train_cfg of the 3x / 160k recipes)."""
    torch.manual_seed(0)
    proposal = dict(nms_pre=2000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0)
    if arch == "mask_rcnn":
        gd.DEPTHS, gd.DIMS, gd.C, gd.FC, gd.NCLS = [3, 3, 9, 3], [96, 192, 384, 768], 256, 1024, 80
        cfg = dict(rpn=rpn_train_cfg(), rpn_proposal=proposal, rcnn=rcnn_train_cfg(0.5, True))
        return gd.build_model(train_cfg=cfg, drop_path_rate=DROP_PATH).train()
    if arch == "cascade":
        gc.NCLS = 80
        cfg = dict(rpn=rpn_train_cfg(), rpn_proposal=proposal,
                   rcnn=[rcnn_train_cfg(t, False) for t in (0.5, 0.6, 0.7)])
        return gc.build_model([3, 3, 9, 3], [96, 192, 384, 768], 256, 1024, train_cfg=cfg,
                              drop_path_rate=DROP_PATH).train()
    import gen_segmentation as gs
    from mmseg.models import build_segmentor
    cfg = gs.model_cfg([3, 3, 9, 3], [96, 192, 384, 768], 512, 256, 150, dict(mode="whole"),
                       drop_path_rate=DROP_PATH)
    return build_segmentor(cfg).train()


def det_inputs(rng):
    """A padded batch with 2-5 boxes per image (10-60 % of each side) and an elliptical mask each,
    as `cnx benchmark --train` makes them."""
    from mmdet.core import BitmapMasks
    h, w = DET_IMG
    ph, pw = DET_PAD
    img = torch.randn(BATCH, 3, ph, pw)
    metas, boxes, labels, masks = [], [], [], []
    for _ in range(BATCH):
        metas.append(dict(img_shape=(h, w, 3), ori_shape=(h, w, 3), pad_shape=(ph, pw, 3),
                          batch_input_shape=(ph, pw), scale_factor=np.ones(4, np.float32), flip=False))
        k = int(rng.integers(2, 6))
        b, m = [], np.zeros((k, ph, pw), np.uint8)
        yy, xx = np.mgrid[0:ph, 0:pw]
        for j in range(k):
            bw, bh = max(w * (0.1 + 0.5 * rng.random()), 4.0), max(h * (0.1 + 0.5 * rng.random()), 4.0)
            x0, y0 = np.floor((w - bw) * rng.random()), np.floor((h - bh) * rng.random())
            bw, bh = np.floor(bw), np.floor(bh)
            b.append([x0, y0, x0 + bw, y0 + bh])
            cx, cy = x0 + bw / 2, y0 + bh / 2
            m[j] = (((xx + 0.5 - cx) / (bw / 2)) ** 2 + ((yy + 0.5 - cy) / (bh / 2)) ** 2 <= 1.0)
        boxes.append(torch.tensor(b, dtype=torch.float32))
        labels.append(torch.from_numpy(rng.integers(0, 80, k)))
        masks.append(BitmapMasks(m, ph, pw))
    return img, metas, boxes, labels, masks


def ref_runner(arch, threads):
    torch.set_num_threads(threads)
    model = reference(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    rng = np.random.default_rng(0)
    if arch == "upernet":
        img = torch.randn(BATCH, 3, *SEG_CROP)
        lab = torch.randint(0, 150, (BATCH, 1, *SEG_CROP))

        def forward():
            return model.forward_train(img, [{}] * BATCH, lab)
    else:
        img, metas, boxes, labels, masks = det_inputs(rng)

        def forward():
            return model.forward_train(img, metas, boxes, labels, gt_masks=masks)

    def step():
        t0 = time.perf_counter()
        loss, _ = model._parse_losses(forward())
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        t3 = time.perf_counter()
        return dict(total=(t3 - t0) * 1e3, forward=(t1 - t0) * 1e3, backward=(t2 - t1) * 1e3,
                    optimizer=(t3 - t2) * 1e3)

    step()  # warm-up
    return step


def run_cnx(cnx, arch, threads, steps):
    args = [cnx, "benchmark", PRESETS[arch], "--train", "--batch", str(BATCH), "--iters", str(steps),
            "--warmup", "1", "--threads", str(threads), "--device", "cpu", "--json"]
    if arch != "upernet":
        args += ["--input", f"{DET_IMG[0]}x{DET_IMG[1]}"]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    j = json.loads(out.strip().splitlines()[-1])
    return dict(total=j["ms_per_iter"], forward=j["forward_ms"], backward=j["backward_ms"],
                optimizer=j["optimizer_ms"])


def main():
    cnx, threads, rounds, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    archs = sys.argv[5:] or ["mask_rcnn", "cascade", "upernet"]
    summary = []
    for arch in archs:
        print(f"== {NAMES[arch]} ConvNeXt-T, batch {BATCH}, "
              f"{'%dx%d' % DET_PAD if arch != 'upernet' else '%dx%d' % SEG_CROP}, {threads} threads, "
              f"{rounds} rounds x {steps} steps", flush=True)
        step = ref_runner(arch, threads)
        ours, ref = [], []
        for r in range(rounds):
            o = run_cnx(cnx, arch, threads, steps)
            f = [step() for _ in range(steps)]
            f = {k: statistics.mean(x[k] for x in f) for k in f[0]}
            ours.append(o)
            ref.append(f)
            print(f"  round {r + 1}: cnx {o['total'] / 1e3:.2f} s/step, reference {f['total'] / 1e3:.2f} s/step, "
                  f"ratio {o['total'] / f['total']:.3f}", flush=True)
        med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
        print(f"  {'phase':<10} {'cnx ms':>9} {'ref ms':>9} {'ratio':>6}")
        for k in ("forward", "backward", "optimizer", "total"):
            print(f"  {k:<10} {med(ours, k):9.0f} {med(ref, k):9.0f} {med(ours, k) / med(ref, k):6.3f}")
        summary.append((arch, med(ours, "total") / med(ref, "total")))
    ref_name = {"mask_rcnn": "mmdet 2.28", "cascade": "mmdet 2.28", "upernet": "mmseg 0.30"}
    goal = {"mask_rcnn": 0.75, "cascade": 0.75, "upernet": 0.9}
    print("ratios cnx / reference (training step, median of rounds):")
    for arch, ratio in summary:
        print(f"  {NAMES[arch]:<20} vs {ref_name[arch]}: {ratio:.3f} (goal <= {goal[arch]})")


if __name__ == "__main__":
    main()
