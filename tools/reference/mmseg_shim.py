"""Make mmsegmentation 0.x importable on mmcv's pure-Python build (MMCV_WITH_OPS=0).

mmcv.ops imports the compiled module `mmcv._ext` at import time even though the UperNet /
FCN heads and the EncoderDecoder never call a compiled op. This installs the one stand-in the
reference tools share (`mmcv_ext_shim`: RoIAlign and NMS over torchvision.ops, every other op
raising if it is ever called), unless a real compiled build is present. Import this module
before `mmseg`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mmcv_ext_shim  # noqa: E402

if "mmcv._ext" not in sys.modules:
    try:
        import mmcv._ext  # noqa: F401  (a real compiled build wins)
    except ImportError:
        mmcv_ext_shim.install()
