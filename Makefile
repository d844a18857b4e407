# make demo / make test: set up from nothing (venv, torch, deps), build the extension, then
# run the demo or the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
EDIT   := $(VENV)/.editable-installed
export MAX_JOBS ?= 2

.PHONY: all build test test-asan asan-build test-portable dist demo info bench-cpu gpu-site clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(DEPS): $(BIN)/python requirements-dev.txt
	$(BIN)/pip install -r requirements-dev.txt
	touch $@

# Editable install once (entry point `moe-ext`) without compiling: `build` compiles the
# extension in place, incrementally (ninja, build/), so a fresh machine compiles it once.
$(EDIT): $(DEPS) pyproject.toml setup.py
	MOE_EXT_NO_EXT=1 $(BIN)/pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(EDIT)
	$(BIN)/python setup.py -q build_ext --inplace

test: build test-cuda-cpu test-asan test-portable
	$(BIN)/python -m pytest -q tests

# The CPU kernels built with AddressSanitizer + UndefinedBehaviorSanitizer (every report
# aborts) into build/asan, apart from the in-place build; test-asan runs the op tests and
# the op fuzzer (tests/ops) on it. ASan's runtime must be loaded first (LD_PRELOAD); leaks
# are not checked (Python keeps much alive at exit); absurd allocations fail instead of
# swapping, so a missing size check shows up as an error or a report.
# (libstdc++ too: ASan's __cxa_throw interceptor needs it loaded before torch.)
ASAN_RUNTIME = $(shell $(CXX) -print-file-name=libasan.so) $(shell $(CXX) -print-file-name=libstdc++.so)

asan-build: $(EDIT)
	MOE_EXT_SANITIZE=1 $(BIN)/python setup.py -q build_ext -b build/asan/lib -t build/asan/tmp

test-asan: asan-build
	MOE_EXT_EXTENSION=$$(ls build/asan/lib/moe_ext/_C*.so) \
	LD_PRELOAD="$(ASAN_RUNTIME)" \
	ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:max_allocation_size_mb=4096 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/ops

# One build for every torch >= 2.10 (the stable ABI): `dist` packs the in-place build into an
# abi3 wheel (linking only: ninja finds the objects up to date) and the sdist. test-portable
# then, in a second venv holding another torch ($(PORTABLE_TORCH), CPU):
#   1. builds and installs the sdist there (CPU kernels only, to keep CI time), an op call;
#   2. installs the wheel built here against torch 2.14 as it is, and runs tests/ops on it
#      (pytest without the source tree on sys.path: the installed package is tested).
PORTABLE       := .venv-portable
PORTABLE_TORCH ?= torch==2.13.0
PORTABLE_DEPS  := $(PORTABLE)/.deps-installed

# auditwheel gives the manylinux tag this machine's glibc allows and grafts nothing: torch's
# libraries (libc10, libtorch_*) and the CUDA runtime (torch's nvidia-* wheels) are loaded
# by `import torch` before moe_ext.
dist: build
	rm -rf dist
	$(BIN)/pip wheel -q --no-build-isolation --no-deps -w dist/raw .
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/auditwheel repair -w dist --exclude 'libc10*.so' \
		--exclude 'libtorch*.so' --exclude 'libcudart.so.*' dist/raw/moe_ext-*.whl
	rm -rf dist/raw
	$(BIN)/python setup.py -q sdist -d dist 2>/dev/null

$(PORTABLE_DEPS):
	$(PYTHON) -m venv $(PORTABLE)
	$(PORTABLE)/bin/pip install -q $(PORTABLE_TORCH) numpy safetensors tqdm pytest hypothesis \
		expecttest setuptools wheel ninja
	touch $@

test-portable: dist $(PORTABLE_DEPS)
	@echo "portable: the sdist builds against $$($(PORTABLE)/bin/python -c 'import torch; print(torch.__version__)')"
	MOE_EXT_CUDA=0 MAX_JOBS=$(MAX_JOBS) $(PORTABLE)/bin/pip install -q --no-build-isolation \
		--no-deps --force-reinstall dist/moe_ext-*.tar.gz
	cd /tmp && $(CURDIR)/$(PORTABLE)/bin/python -c "import torch, moe_ext; \
		y = moe_ext.functional.molora(torch.randn(5, 8), torch.randn(5, 4), torch.randn(4, 2, 8), \
		torch.randn(4, 6, 2), top_k=2, scaling=1.0); assert y.shape == (5, 6); \
		print('portable: sdist build of moe_ext', moe_ext.__version__, 'runs on torch', torch.__version__)"
	$(PORTABLE)/bin/pip install -q --no-deps --force-reinstall dist/moe_ext-*-cp310-abi3-manylinux_*.whl
	cd /tmp && $(CURDIR)/$(PORTABLE)/bin/python -c "import moe_ext, os; assert 'site-packages' in moe_ext.__file__; \
		print('portable: the wheel built against torch 2.14 at', os.path.dirname(moe_ext.__file__))"
	$(PORTABLE)/bin/pytest -q -p no:cacheprovider tests/ops

demo: build
	$(BIN)/moe-ext demo

info: build
	$(BIN)/moe-ext info

bench-cpu: build
	$(BIN)/python benchmarks/bench_lora.py --device cpu --threads 2 --tokens 4096 --features 1024 \
		--experts 8 64 --reps 7

# Pure-Python test dependencies for a GPU machine that has torch but no package index:
# carried there beside the tree (see benchmarks/gpu_session.sh).
gpu-site: $(DEPS)
	$(BIN)/pip install --quiet --no-deps --target .gpu-site pytest pluggy iniconfig \
		hypothesis sortedcontainers attrs safetensors tqdm expecttest

clean:
	rm -rf build dist moe_ext/*.so *.egg-info .pytest_cache

# The CUDA kernels on the CPU execution model, under sanitizers (no GPU needed).
include tests/cuda_cpu/cuda_cpu.mk
