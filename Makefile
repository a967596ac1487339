# Two commands set everything up: `make demo` and `make test`. Both create .venv/ with the
# PyTorch build that tch links against (installed from PyPI when missing), build, then run.
SHELL := /bin/bash
TORCH_VERSION := 2.11.0
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
TORCH_STAMP := $(VENV)/.torch-$(TORCH_VERSION)
REF_STAMP := $(VENV)/.reference-deps

# torch-sys finds libtorch through the active Python (LIBTORCH_USE_PYTORCH).
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
CARGO ?= cargo
BIN := target/release/cnx

.PHONY: setup build demo demo-seg test lint bench reference parity clean-venv

$(TORCH_STAMP):
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null \
	  || $(PY) -m pip install --disable-pip-version-check -q torch==$(TORCH_VERSION)
	@touch $@

# cnx-dist compiles against torch.distributed's ProcessGroupGloo, whose headers include Gloo's own,
# which the wheel does not ship: Debian's libgloo-dev provides them (headers only are used).
GLOO_HEADER := /usr/include/gloo/config.h

$(GLOO_HEADER):
	@if [ "$$(id -u)" = 0 ]; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q libgloo-dev || { apt-get update -q && apt-get install -y -q libgloo-dev; }; \
	else \
	  echo "Gloo headers ($@) are missing; install them with: sudo apt-get install -y -q libgloo-dev" >&2; \
	  exit 1; \
	fi

# NCCL's header (in the nvidia-nccl wheel torch depends on) includes CUDA headers the runtime
# wheels lack (crt/host_config.h, nv/target): for a CUDA build of torch, the matching header-only
# wheels go into the venv so cnx-dist compiles its NCCL process group (used on GPU machines).
CUDA_HDR_STAMP := $(VENV)/.cuda-headers
$(CUDA_HDR_STAMP): $(TORCH_STAMP)
	@cu=$$($(PY) -c "import torch; print(torch.version.cuda or '')"); \
	if [ -n "$$cu" ]; then \
	  $(PY) -m pip install --disable-pip-version-check -q "nvidia-cuda-crt==$$cu.*" "nvidia-cuda-cccl==$$cu.*"; \
	fi
	@touch $@

setup: $(TORCH_STAMP) $(GLOO_HEADER) $(CUDA_HDR_STAMP)

build: setup
	$(CARGO) build --release

# The main job on data the project makes itself: synthetic COCO-format shapes -> train a small
# ConvNeXt Mask R-CNN on CPU through `cnx train`'s code path -> COCO AP on held-out images,
# drawn predictions and loss/metric curves under work_dirs/demo_det. `make demo-seg` does the
# same for UperNet on synthetic ADE-format scenes (mIoU).
demo: build
	$(BIN) demo det

demo-seg: build
	$(BIN) demo seg

# The GPU check script's dry run (CPU, tiny inputs) keeps it working between GPU visits (~1-2 min).
test: setup
	$(CARGO) build --release
	$(CARGO) test --release --workspace
	GPU_CHECK_DRY=1 bash scripts/gpu_check.sh

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

# Python reference tools (timm, torchvision, pycocotools, cv2, mmdet...) for fixtures and benchmarks.
# mmcv 1.7 builds from source: its setup.py needs setuptools' pkg_resources in the build env, so
# it is built without isolation, and without its C++/CUDA ops (the reference scripts shim them).
$(REF_STAMP): $(TORCH_STAMP) tools/reference/requirements.txt tools/reference/requirements-mm.txt
	$(PY) -m pip install --disable-pip-version-check -q -r tools/reference/requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q "setuptools<81" wheel
	MMCV_WITH_OPS=0 $(PY) -m pip install --disable-pip-version-check -q --no-build-isolation \
	  -r tools/reference/requirements-mm.txt
	@touch $@

reference: $(REF_STAMP)
	@set -e; for s in tools/reference/gen_*.py; do echo "== $$s"; $(PY) $$s; done

parity: $(REF_STAMP) build
	$(PY) tools/reference/parity_full.py

bench: $(REF_STAMP) build
	@set -e; for s in bench/*.sh; do echo "== $$s"; bash $$s; done
