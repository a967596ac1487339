"""Stand-in for SciPy on the GPU machine (scripts/gpu_wheelhouse.sh): mmdet 2.28 imports
`scipy.optimize.linear_sum_assignment` at import time for its Hungarian assigner (DETR-style
heads), which the Mask R-CNN / Cascade comparisons never use. Only on sys.path when the real
SciPy is absent."""
