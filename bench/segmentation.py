"""bench/segmentation.sh: UperNet + ConvNeXt-T (upernet_convnext_tiny_512_160k, random weights)
CPU inference of one 512x2048 image, eval, no grad, whole_inference and slide_inference (crop
512, stride 341) rescaled to 512x2048: cnx (target/release/examples/bench_segmentation, driven
over a pipe) against mmsegmentation 0.30's EncoderDecoder with UPerHead + FCNHead on the
official-layout ConvNeXt-T, in this process. The two alternate run by run, so a change in machine
load hits both alike. Prints a table of medians (and minima) and ours/reference.
Args: RUNS WARMUP [whole|slide ...]."""
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "tools", "reference"))
import gen_segmentation as g  # noqa: E402  (imports the mmcv shim and registers ConvNeXtRef)
import torch  # noqa: E402
from mmseg.models import build_segmentor  # noqa: E402


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    warmup = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    modes = sys.argv[3:] or ["whole", "slide"]
    torch.manual_seed(0)
    cfg = g.model_cfg([3, 3, 9, 3], [96, 192, 384, 768], 512, 256, 150,
                      dict(mode="whole", crop_size=(512, 512), stride=(341, 341)))
    model = build_segmentor(cfg).eval()
    x = torch.randn(1, 3, 512, 2048)
    meta = [dict(ori_shape=(512, 2048, 3), img_shape=(512, 2048, 3), pad_shape=(512, 2048, 3), flip=False)]
    fns = {"whole": model.whole_inference, "slide": model.slide_inference}
    ours = subprocess.Popen([os.path.join(ROOT, "target", "release", "examples", "bench_segmentation")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert ours.stdout.readline().strip() == "ready"

    def run_ours(mode):
        ours.stdin.write(mode + "\n")
        ours.stdin.flush()
        return float(ours.stdout.readline())

    def run_ref(mode):
        t = time.perf_counter()
        with torch.no_grad():
            y = fns[mode](x, meta, rescale=True)
        ms = (time.perf_counter() - t) * 1e3
        assert tuple(y.shape) == (1, 150, 512, 2048)
        return ms

    rows = []
    for mode in modes:
        t_ours, t_ref = [], []
        for i in range(warmup + runs):
            o, r = run_ours(mode), run_ref(mode)
            if i >= warmup:
                t_ours.append(o)
                t_ref.append(r)
        rows.append((mode, t_ours, t_ref))
    ours.stdin.close()
    ours.wait()
    print(f"{'mode':<7} {'cnx ms':>9} {'mmseg ms':>9} {'ratio':>6}   {'cnx min':>9} {'mmseg min':>9} {'ratio':>6}")
    for mode, o, r in rows:
        mo, mr = statistics.median(o), statistics.median(r)
        print(f"{mode:<7} {mo:9.1f} {mr:9.1f} {mo / mr:6.3f}   {min(o):9.1f} {min(r):9.1f} {min(o) / min(r):6.3f}")
    print(f"(upernet_convnext_tiny_512_160k, 1x3x512x2048, {torch.get_num_threads()} threads, "
          f"median and min of {runs} alternating runs after {warmup} warm-up; goal ratio <= 1.0)")


if __name__ == "__main__":
    main()
