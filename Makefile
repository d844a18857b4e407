# make demo / make test: set up from nothing (venv, torch, deps), build the extension, then
# run the demo or the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
EDIT   := $(VENV)/.editable-installed
export MAX_JOBS ?= 2

.PHONY: all build test test-asan asan-build demo info bench-cpu gpu-site clean

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

test: build test-cuda-cpu test-asan
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
	rm -rf build moe_ext/*.so *.egg-info .pytest_cache

# The CUDA kernels on the CPU execution model, under sanitizers (no GPU needed).
include tests/cuda_cpu/cuda_cpu.mk
