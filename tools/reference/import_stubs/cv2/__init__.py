"""Stand-in for OpenCV on the GPU machine (scripts/gpu_wheelhouse.sh): mmcv imports cv2 at import
time and reads its constants, but the model comparisons never decode, resize or draw an image.
Constants read as 0 and `setNumThreads` is accepted; any other function raises when called, so a
silent fallback cannot happen. Only on sys.path when the real OpenCV is absent."""


def setNumThreads(n):  # noqa: N802  (mmcv and torch DataLoader workers call it)
    return None


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    if name[:1].isupper() or name.isupper():
        return 0

    def missing(*a, **k):
        raise NotImplementedError(f"cv2.{name}: OpenCV is not installed (import stub)")

    return missing
