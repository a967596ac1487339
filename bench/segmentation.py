"""Reference side of bench/segmentation.sh: mmsegmentation 0.30's EncoderDecoder with UPerHead +
FCNHead on the official-layout ConvNeXt-T (upernet_convnext_tiny_512_160k, random weights), one
512x2048 image on CPU, eval, no grad: whole_inference and slide_inference (crop 512, stride
341), rescaled to 512x2048. Prints `mode median_ms` lines. Args: [runs] [warmup] [whole|slide]."""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "reference"))
import gen_segmentation as g  # noqa: E402  (imports the mmcv shim and registers ConvNeXtRef)
import torch  # noqa: E402
from mmseg.models import build_segmentor  # noqa: E402


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    warmup = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    only = sys.argv[3] if len(sys.argv) > 3 else None
    torch.manual_seed(0)
    cfg = g.model_cfg([3, 3, 9, 3], [96, 192, 384, 768], 512, 256, 150,
                      dict(mode="whole", crop_size=(512, 512), stride=(341, 341)))
    model = build_segmentor(cfg).eval()
    x = torch.randn(1, 3, 512, 2048)
    meta = [dict(ori_shape=(512, 2048, 3), img_shape=(512, 2048, 3), pad_shape=(512, 2048, 3), flip=False)]
    for name, fn in (("whole", model.whole_inference), ("slide", model.slide_inference)):
        if only is not None and name != only:
            continue
        times = []
        for i in range(warmup + runs):
            t = time.perf_counter()
            with torch.no_grad():
                y = fn(x, meta, rescale=True)
            assert tuple(y.shape) == (1, 150, 512, 2048)
            if i >= warmup:
                times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        print(f"{name} {times[len(times) // 2]:.1f}")


if __name__ == "__main__":
    main()
