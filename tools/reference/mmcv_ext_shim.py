"""Stand-in for mmcv's compiled `mmcv._ext` (absent in the pure-Python mmcv build).

Install with `install()` before importing mmdet/mmseg. Only the ops the Mask R-CNN / UperNet
reference networks run are real (RoIAlign forward and backward, NMS), computed by
torchvision.ops; every other symbol exists (mmcv asserts their presence at import time) but raises
when called.
"""
import sys
import types

import torch
import torchvision


def _roi_align_forward(input, rois, output, argmax_y, argmax_x, aligned_height=7, aligned_width=7,
                       spatial_scale=1.0, sampling_ratio=0, pool_mode=1, aligned=True):
    assert pool_mode == 1, "only avg pooling RoIAlign is provided"
    out = torchvision.ops.roi_align(input, rois, (aligned_height, aligned_width), spatial_scale,
                                    sampling_ratio, aligned)
    output.copy_(out)


def _roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, aligned_height=7, aligned_width=7,
                        spatial_scale=1.0, sampling_ratio=0, pool_mode=1, aligned=True):
    assert pool_mode == 1, "only avg pooling RoIAlign is provided"
    n, c, h, w = grad_input.shape
    g = torch.ops.torchvision._roi_align_backward(grad_output.contiguous(), rois, spatial_scale, aligned_height,
                                                   aligned_width, n, c, h, w, sampling_ratio, aligned)
    grad_input.copy_(g)


def _nms(bboxes, scores, iou_threshold=0.5, offset=0):
    assert offset == 0, "mmdet 2.x uses offset 0"
    return torchvision.ops.nms(bboxes.float(), scores.float(), iou_threshold)


class _Ext(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*a, **k):
            raise NotImplementedError(f"mmcv._ext.{name} is not provided by the shim")

        return missing


def install():
    mod = _Ext("mmcv._ext")
    mod.roi_align_forward = _roi_align_forward
    mod.roi_align_backward = _roi_align_backward
    mod.nms = _nms
    sys.modules["mmcv._ext"] = mod
    return mod
