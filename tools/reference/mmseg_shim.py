"""Make mmsegmentation 0.x importable on mmcv's pure-Python build (MMCV_WITH_OPS=0).

mmcv.ops imports the compiled module `mmcv._ext` at import time even though the UperNet /
FCN heads and the EncoderDecoder never call a compiled op. This installs a stand-in module
whose functions raise if they are ever called, so a silent fallback can never happen.
Import this module before `mmseg`.
"""
import sys
import types


class _MissingExt(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def _missing(*_a, **_k):
            raise RuntimeError(f"mmcv._ext.{name} is a compiled op, absent from the pure-Python build")

        return _missing


if "mmcv._ext" not in sys.modules:
    try:
        import mmcv._ext  # noqa: F401  (a real compiled build wins)
    except ImportError:
        sys.modules["mmcv._ext"] = _MissingExt("mmcv._ext")
