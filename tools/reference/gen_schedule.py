"""Learning-rate fixture for the engine's schedules, produced by mmcv 1.7.2's own LrUpdaterHook
classes (StepLrUpdaterHook by epoch, PolyLrUpdaterHook by iteration) driven by a fake runner.

Writes tests/fixtures/schedule/mmcv_lr.json: for each case, (global iteration, lr) pairs.
"""
import json
import os
import sys
import types

sys.path.insert(0, os.path.dirname(__file__))
try:
    import mmcv_ext_shim  # noqa: F401  (mmcv asserts its compiled ops exist at import time)
    mmcv_ext_shim.install()
except Exception:
    pass

import torch
from mmcv.runner.hooks.lr_updater import PolyLrUpdaterHook, StepLrUpdaterHook

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "schedule", "mmcv_lr.json")


def run(hook, base_lr, iters_per_epoch, max_epochs=None, max_iters=None, sample=None):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=base_lr)
    runner = types.SimpleNamespace(optimizer=opt, epoch=0, iter=0,
                                   data_loader=list(range(iters_per_epoch)))
    if max_iters is None:
        max_iters = max_epochs * iters_per_epoch
    if max_epochs is None:
        max_epochs = (max_iters + iters_per_epoch - 1) // iters_per_epoch
    runner.max_iters = max_iters
    runner.max_epochs = max_epochs
    hook.before_run(runner)
    out = []
    it = 0
    for epoch in range(max_epochs):
        runner.epoch = epoch
        hook.before_train_epoch(runner)
        for _ in range(iters_per_epoch):
            if it >= max_iters:
                break
            runner.iter = it
            hook.before_train_iter(runner)
            if sample is None or it in sample:
                out.append([it, opt.param_groups[0]["lr"]])
            it += 1
    return out


def main():
    cases = []
    # The COCO recipe, shrunk: 100 iterations per epoch, 36 epochs, warmup 500, steps 27/33.
    h = StepLrUpdaterHook(step=[27, 33], warmup="linear", warmup_iters=500, warmup_ratio=0.001)
    sample = set(range(0, 520)) | set(range(2690, 2710)) | set(range(3290, 3310)) | {3599}
    cases.append(dict(name="coco_step", policy="step", step=[27, 33], warmup_iters=500,
                      warmup_ratio=0.001, iters_per_epoch=100, max_iters=3600, base_lr=1e-4,
                      lrs=run(h, 1e-4, 100, max_epochs=36, sample=sample)))
    # Warmup longer than an epoch with the step inside it.
    h = StepLrUpdaterHook(step=[2, 3], warmup="linear", warmup_iters=50, warmup_ratio=0.01)
    cases.append(dict(name="short_step", policy="step", step=[2, 3], warmup_iters=50,
                      warmup_ratio=0.01, iters_per_epoch=20, max_iters=80, base_lr=2e-4,
                      lrs=run(h, 2e-4, 20, max_epochs=4)))
    # The ADE recipe: poly power 1, min_lr 0, by iteration, warmup 1500 from 1e-6.
    h = PolyLrUpdaterHook(power=1.0, min_lr=0.0, by_epoch=False, warmup="linear", warmup_iters=1500,
                          warmup_ratio=1e-6)
    sample = set(range(0, 1510)) | set(range(0, 160000, 997)) | {159999}
    cases.append(dict(name="ade_poly", policy="poly", power=1.0, min_lr=0.0, warmup_iters=1500,
                      warmup_ratio=1e-6, iters_per_epoch=160000, max_iters=160000, base_lr=1e-4,
                      lrs=run(h, 1e-4, 160000, max_iters=160000, sample=sample)))
    h = PolyLrUpdaterHook(power=0.9, min_lr=1e-6, by_epoch=False, warmup="linear", warmup_iters=10,
                          warmup_ratio=0.1)
    cases.append(dict(name="poly_min_lr", policy="poly", power=0.9, min_lr=1e-6, warmup_iters=10,
                      warmup_ratio=0.1, iters_per_epoch=100, max_iters=100, base_lr=1e-3,
                      lrs=run(h, 1e-3, 100, max_iters=100)))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"source": "mmcv " + __import__("mmcv").__version__, "cases": cases}, f)
    print("wrote", OUT, sum(len(c["lrs"]) for c in cases), "lr values")


if __name__ == "__main__":
    main()
