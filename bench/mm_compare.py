"""cnx against the PyTorch reference a user would otherwise run (mmdetection 2.28 MaskRCNN /
CascadeRCNN, mmsegmentation 0.30 EncoderDecoder with UPerHead + FCNHead) on the ConvNeXt-T presets:
a training step (forward + backward + AdamW) or end-to-end inference, CPU or CUDA, fp32 or fp16
autocast. cnx runs as `cnx benchmark PRESET [--train] --json`, the reference as this script in
`--worker` mode, each in a child process per round (neither runs beside the other's memory: on
this VM an idle process holding 4.4 GB slowed the other's training step by 15 %), on the same
architecture (the presets' stochastic depth 0.4
included), batch, input shapes, synthetic inputs and random weights, with the same threads. The
two alternate round by round so a change in machine load hits both alike; each side's warm-up is
untimed. Prints per-phase milliseconds, images/s, peak memory and the ratios cnx / reference;
`--json FILE` also writes one object per architecture.

Used by bench/train_step.sh (CPU training) and scripts/gpu_check.sh (CUDA: fp16 training,
inference at 1280x800)."""
import argparse
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
# OpenCV / matplotlib / SciPy are imported by mmcv / mmdet but never used here: where they are absent
# (the GPU machine's offline install), import stubs stand in (after site-packages, so a real
# installation wins). CNX_IMPORT_STUBS=1 puts the stubs first (the dry run proves with it that
# nothing here calls them).
_STUBS = os.path.join(HERE, "..", "tools", "reference", "import_stubs")
if os.environ.get("CNX_IMPORT_STUBS") == "1":
    sys.path.insert(0, _STUBS)
else:
    for _mod in ("cv2", "matplotlib", "scipy"):
        try:
            __import__(_mod)
        except ImportError:
            sys.path.append(_STUBS)
            break
import gen_detection as gd  # noqa: E402  (installs the mmcv._ext shim: RoIAlign forward/backward, NMS)
import gen_cascade as gc  # noqa: E402

DROP_PATH = 0.4  # the ConvNeXt-T presets' stochastic depth (detection and segmentation)
PRESETS = {
    "mask_rcnn": "mask_rcnn_convnext_tiny_3x",
    "cascade": "cascade_mask_rcnn_convnext_tiny_3x",
    "upernet": "upernet_convnext_tiny_512_160k",
}
NAMES = {"mask_rcnn": "Mask R-CNN", "cascade": "Cascade Mask R-CNN", "upernet": "UperNet"}
REF = {"mask_rcnn": "mmdet 2.28", "cascade": "mmdet 2.28", "upernet": "mmseg 0.30"}


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
    """The reference network with mmdet/mmseg's own train_cfg of the 3x / 160k recipes."""
    torch.manual_seed(0)
    proposal = dict(nms_pre=2000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0)
    if arch == "mask_rcnn":
        gd.DEPTHS, gd.DIMS, gd.C, gd.FC, gd.NCLS = [3, 3, 9, 3], [96, 192, 384, 768], 256, 1024, 80
        cfg = dict(rpn=rpn_train_cfg(), rpn_proposal=proposal, rcnn=rcnn_train_cfg(0.5, True))
        return gd.build_model(train_cfg=cfg, drop_path_rate=DROP_PATH)
    if arch == "cascade":
        gc.NCLS = 80
        cfg = dict(rpn=rpn_train_cfg(), rpn_proposal=proposal,
                   rcnn=[rcnn_train_cfg(t, False) for t in (0.5, 0.6, 0.7)])
        return gc.build_model([3, 3, 9, 3], [96, 192, 384, 768], 256, 1024, train_cfg=cfg,
                              drop_path_rate=DROP_PATH)
    import gen_segmentation as gs
    from mmseg.models import build_segmentor
    cfg = gs.model_cfg([3, 3, 9, 3], [96, 192, 384, 768], 512, 256, 150, dict(mode="whole"),
                       drop_path_rate=DROP_PATH)
    return build_segmentor(cfg)


def pad32(x):
    return (x + 31) // 32 * 32


def det_inputs(rng, batch, hw, device, train):
    """A padded batch; for training 2-5 boxes per image (10-60 % of each side) with an elliptical
    mask each, as `cnx benchmark --train` makes them."""
    h, w = hw
    ph, pw = pad32(h), pad32(w)
    img = torch.randn(batch, 3, ph, pw, device=device)
    metas = [dict(img_shape=(h, w, 3), ori_shape=(h, w, 3), pad_shape=(ph, pw, 3), batch_input_shape=(ph, pw),
                  scale_factor=np.ones(4, np.float32), flip=False) for _ in range(batch)]
    if not train:
        return img, metas, None
    from mmdet.core import BitmapMasks
    boxes, labels, masks = [], [], []
    yy, xx = np.mgrid[0:ph, 0:pw]
    for _ in range(batch):
        k = int(rng.integers(2, 6))
        b, m = [], np.zeros((k, ph, pw), np.uint8)
        for j in range(k):
            bw, bh = max(w * (0.1 + 0.5 * rng.random()), 4.0), max(h * (0.1 + 0.5 * rng.random()), 4.0)
            x0, y0 = np.floor((w - bw) * rng.random()), np.floor((h - bh) * rng.random())
            bw, bh = np.floor(bw), np.floor(bh)
            b.append([x0, y0, x0 + bw, y0 + bh])
            cx, cy = x0 + bw / 2, y0 + bh / 2
            m[j] = (((xx + 0.5 - cx) / (bw / 2)) ** 2 + ((yy + 0.5 - cy) / (bh / 2)) ** 2 <= 1.0)
        boxes.append(torch.tensor(b, dtype=torch.float32, device=device))
        labels.append(torch.from_numpy(rng.integers(0, 80, k)).to(device))
        masks.append(BitmapMasks(m, ph, pw))
    return img, metas, (boxes, labels, masks)


class Reference:
    """One timed iteration of the reference (`step()` -> milliseconds per phase)."""

    def __init__(self, a, arch):
        torch.set_num_threads(a.threads)
        self.dev = torch.device(a.device)
        self.cuda = self.dev.type == "cuda"
        self.amp = a.amp == "fp16"
        model = reference(arch).to(self.dev)
        self.model = model.train() if a.train else model.eval()
        self.train = a.train
        rng = np.random.default_rng(0)
        if arch == "upernet":
            h, w = a.input or (512, 512)
            img = torch.randn(a.batch, 3, h, w, device=self.dev)
            if a.train:
                lab = torch.randint(0, 150, (a.batch, 1, h, w), device=self.dev)
                self.forward = lambda: model.forward_train(img, [{}] * a.batch, lab)
            else:
                meta = [dict(ori_shape=(h, w, 3), img_shape=(h, w, 3), pad_shape=(h, w, 3), flip=False)] * a.batch
                self.forward = lambda: model.whole_inference(img, meta, rescale=True).argmax(1)
        else:
            hw = a.input or ((800, 1067) if a.train else (800, 1333))
            img, metas, gt = det_inputs(rng, a.batch, hw, self.dev, a.train)
            if a.train:
                boxes, labels, masks = gt
                self.forward = lambda: model.forward_train(img, metas, boxes, labels, gt_masks=masks)
            else:
                self.forward = lambda: model.simple_test(img, metas, rescale=True)
        if a.train:
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
            self.scaler = torch.amp.GradScaler(self.dev.type, enabled=self.amp)
        for _ in range(a.warmup):
            self.step()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def step(self):
        self.sync()
        t0 = time.perf_counter()
        with torch.autocast(self.dev.type, dtype=torch.float16, enabled=self.amp):
            if not self.train:
                with torch.no_grad():
                    self.forward()
                self.sync()
                return dict(total=(time.perf_counter() - t0) * 1e3)
            loss, _ = self.model._parse_losses(self.forward())
        self.sync()
        t1 = time.perf_counter()
        self.scaler.scale(loss).backward()
        self.sync()
        t2 = time.perf_counter()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad()
        self.sync()
        t3 = time.perf_counter()
        return dict(total=(t3 - t0) * 1e3, forward=(t1 - t0) * 1e3, backward=(t2 - t1) * 1e3,
                    optimizer=(t3 - t2) * 1e3)

    def peak_mb(self):
        if not self.cuda:
            return None
        return (torch.cuda.max_memory_allocated(self.dev) / 2**20, torch.cuda.max_memory_reserved(self.dev) / 2**20)


def run_reference(a, arch):
    """One round of the reference in a child process: warm-up, `--steps` timed iterations."""
    args = [sys.executable, os.path.abspath(__file__), "--worker", arch, "--threads", str(a.threads),
            "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch),
            "--device", a.device, "--amp", a.amp]
    if a.train:
        args.append("--train")
    if a.input:
        args += ["--input", f"{a.input[0]}x{a.input[1]}"]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def worker(a):
    """`--worker ARCH`: time the reference and print one JSON object (phase means, peak memory)."""
    ref = Reference(a, a.worker)
    f = [ref.step() for _ in range(a.steps)]
    r = {k: statistics.mean(x[k] for x in f) for k in f[0]}
    r["peak"] = ref.peak_mb()
    print(json.dumps(r))


def run_cnx(a, arch):
    args = [a.cnx, "benchmark", PRESETS[arch], "--batch", str(a.batch), "--iters", str(a.steps),
            "--warmup", str(a.warmup), "--threads", str(a.threads), "--device", a.device, "--json"]
    if a.train:
        args.append("--train")
    if a.amp != "fp32":
        args += ["--amp", a.amp]
    hw = a.input or (None if arch == "upernet" else ((800, 1067) if a.train else None))
    if hw:
        args += ["--input", f"{hw[0]}x{hw[1]}"]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    j = json.loads(out.strip().splitlines()[-1])
    r = dict(total=j["ms_per_iter"], peak=(j.get("peak_mem_mb"), j.get("peak_reserved_mb")), shape=j["input"])
    if a.train:
        r.update(forward=j["forward_ms"], backward=j["backward_ms"], optimizer=j["optimizer_ms"])
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("archs", nargs="*", metavar="ARCH", help="mask_rcnn, cascade, upernet (default: all)")
    p.add_argument("--cnx", default=os.path.join(HERE, "..", "target", "release", "cnx"))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed iterations per round and side")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--train", action="store_true", help="a training step (default: inference)")
    p.add_argument("--input", type=lambda s: tuple(int(v) for v in s.split("x")), default=None,
                   help="HxW before padding (default: 800x1067 detection training, 800x1333 inference, 512x512 UperNet)")
    p.add_argument("--json", default=None, help="append one JSON object per architecture to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    a.archs = a.archs or ["mask_rcnn", "cascade", "upernet"]
    bad = [x for x in a.archs if x not in PRESETS]
    if bad:
        p.error(f"unknown architecture(s) {bad}: choose from {list(PRESETS)}")
    what = "training step" if a.train else "inference"
    summary = []
    for arch in a.archs:
        ours, theirs = [], []
        print(f"== {NAMES[arch]} ConvNeXt-T {what}, batch {a.batch}, {a.device} {a.amp}, {a.threads} threads, "
              f"{a.rounds} rounds x {a.steps}", flush=True)
        for r in range(a.rounds):
            o = run_cnx(a, arch)
            f = run_reference(a, arch)
            ours.append(o)
            theirs.append(f)
            print(f"  round {r + 1}: cnx {o['total']:.1f} ms, {REF[arch]} {f['total']:.1f} ms, "
                  f"ratio {o['total'] / f['total']:.3f}  (input {o['shape'][0]}x{o['shape'][1]})", flush=True)
        med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
        phases = ("forward", "backward", "optimizer", "total") if a.train else ("total",)
        print(f"  {'phase':<10} {'cnx ms':>9} {'ref ms':>9} {'ratio':>6}")
        for k in phases:
            print(f"  {k:<10} {med(ours, k):9.1f} {med(theirs, k):9.1f} {med(ours, k) / med(theirs, k):6.3f}")
        row = dict(arch=arch, preset=PRESETS[arch], reference=REF[arch], device=a.device, amp=a.amp,
                   train=a.train, batch=a.batch,
                   cnx_ms=med(ours, "total"), ref_ms=med(theirs, "total"),
                   cnx_images_per_s=a.batch * 1e3 / med(ours, "total"),
                   ref_images_per_s=a.batch * 1e3 / med(theirs, "total"),
                   ratio=med(ours, "total") / med(theirs, "total"),
                   cnx_peak_mb=ours[-1]["peak"], ref_peak_mb=theirs[-1]["peak"])
        if a.train:
            for k in ("forward", "backward", "optimizer"):
                row[f"cnx_{k}_ms"], row[f"ref_{k}_ms"] = med(ours, k), med(theirs, k)
        print(f"  images/s: cnx {row['cnx_images_per_s']:.2f}, {REF[arch]} {row['ref_images_per_s']:.2f}; "
              f"peak memory MB (allocated, reserved): cnx {row['cnx_peak_mb']}, {REF[arch]} {row['ref_peak_mb']}",
              flush=True)
        summary.append(row)
        if a.json:
            with open(a.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    print(f"ratios cnx / reference ({what}, median of rounds; < 1 = cnx faster):")
    for row in summary:
        print(f"  {NAMES[row['arch']]:<20} vs {row['reference']}: {row['ratio']:.3f}")


if __name__ == "__main__":
    main()
