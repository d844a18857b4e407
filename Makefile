# make demo / make test: set up from nothing (venv, torch, deps), build the extension, then
# run the demo or the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
EDIT   := $(VENV)/.editable-installed
export MAX_JOBS ?= 2

.PHONY: all build test demo info bench-cpu gpu-site clean

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

test: build test-cuda-cpu
	$(BIN)/python -m pytest -q tests

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
