# make test-cuda-cpu: the CUDA kernels of csrc/cuda run on the CPU execution model
# (csrc/cuda/cpu_model, see csrc/cuda/README.md), no GPU and no torch needed:
#   1. every case under ASan + UBSan,
#   2. the "tsan" subset under ThreadSanitizer,
#   3. the self-test (tests/cuda_cpu/mutants.py): mutated kernels must fail, a hang must
#      end in the watchdog,
#   4. nvcc compiles the PTX wrappers' test kernels for sm_80 and sm_90a (when nvcc exists).
# Included by the Makefile; objects in build/cuda_cpu/{asan,tsan}, rebuilt incrementally.
CUDA_CPU_DIR      := build/cuda_cpu
CUDA_CPU_SRCS     := $(sort $(wildcard csrc/cuda/*.cu) $(wildcard tests/cuda_cpu/*.cu) \
                       $(wildcard tests/cuda_cpu/*.cpp))
CUDA_CPU_CXXFLAGS := -std=c++17 -DMOE_EXT_CPU_MODEL -Icsrc/cuda -Itests/cuda_cpu -g -O0 \
                     -fno-omit-frame-pointer -fdata-sections -pthread -Wall -Wno-sign-compare \
                     -Wno-unknown-pragmas
CUDA_CPU_LDFLAGS  := -pthread -Wl,-T,csrc/cuda/cpu_model/shared_memory.ld
CUDA_CPU_ASAN     := -fsanitize=address,undefined -fno-sanitize-recover=all
CUDA_CPU_TSAN     := -fsanitize=thread
CUDA_CPU_ENV      := MOE_CPU_MODEL_TIMEOUT_S=60 ASAN_OPTIONS=detect_leaks=1 \
                     UBSAN_OPTIONS=print_stacktrace=1 TSAN_OPTIONS=halt_on_error=1
NVCC              ?= $(firstword $(shell command -v nvcc 2>/dev/null) $(wildcard /usr/local/cuda/bin/nvcc))

CUDA_CPU_ASAN_OBJS := $(CUDA_CPU_SRCS:%=$(CUDA_CPU_DIR)/asan/%.o)
CUDA_CPU_TSAN_OBJS := $(CUDA_CPU_SRCS:%=$(CUDA_CPU_DIR)/tsan/%.o)

$(CUDA_CPU_DIR)/asan/%.o: %
	@mkdir -p $(@D)
	$(CXX) $(CUDA_CPU_CXXFLAGS) $(CUDA_CPU_ASAN) -MMD -MP -x c++ -c $< -o $@

$(CUDA_CPU_DIR)/tsan/%.o: %
	@mkdir -p $(@D)
	$(CXX) $(CUDA_CPU_CXXFLAGS) $(CUDA_CPU_TSAN) -MMD -MP -x c++ -c $< -o $@

$(CUDA_CPU_DIR)/asan/cuda_cpu_tests: $(CUDA_CPU_ASAN_OBJS) csrc/cuda/cpu_model/shared_memory.ld
	$(CXX) $(CUDA_CPU_ASAN) $(CUDA_CPU_ASAN_OBJS) $(CUDA_CPU_LDFLAGS) -o $@

$(CUDA_CPU_DIR)/tsan/cuda_cpu_tests: $(CUDA_CPU_TSAN_OBJS) csrc/cuda/cpu_model/shared_memory.ld
	$(CXX) $(CUDA_CPU_TSAN) $(CUDA_CPU_TSAN_OBJS) $(CUDA_CPU_LDFLAGS) -o $@

-include $(CUDA_CPU_ASAN_OBJS:.o=.d) $(CUDA_CPU_TSAN_OBJS:.o=.d)

.PHONY: test-cuda-cpu cuda-cpu-binaries cuda-cpu-nvcc-check
cuda-cpu-binaries: $(CUDA_CPU_DIR)/asan/cuda_cpu_tests $(CUDA_CPU_DIR)/tsan/cuda_cpu_tests

cuda-cpu-nvcc-check:
ifneq ($(NVCC),)
	@mkdir -p $(CUDA_CPU_DIR)
	$(NVCC) -std=c++20 --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ \
		-D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
		-D__CUDA_NO_HALF2_OPERATORS__ -Icsrc/cuda -Itests/cuda_cpu \
		-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a \
		-c tests/cuda_cpu/ptx_kernels.cu -o $(CUDA_CPU_DIR)/ptx_kernels_nvcc.o
else
	@echo "cuda-cpu: no nvcc, the PTX wrappers were not compiled for a GPU"
endif

test-cuda-cpu:
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory -j$(MAX_JOBS) cuda-cpu-binaries cuda-cpu-nvcc-check && \
	built=$$(date +%s) && \
	echo "cuda-cpu: ASan + UBSan, every case" && \
	$(CUDA_CPU_ENV) $(CUDA_CPU_DIR)/asan/cuda_cpu_tests && \
	echo "cuda-cpu: TSan, the tsan subset" && \
	$(CUDA_CPU_ENV) $(CUDA_CPU_DIR)/tsan/cuda_cpu_tests --tag tsan && \
	echo "cuda-cpu: self-test, mutated kernels must fail" && \
	$(PYTHON) tests/cuda_cpu/mutants.py --build=$(CUDA_CPU_DIR) --cxx="$(CXX)" \
		--cxxflags="$(CUDA_CPU_CXXFLAGS)" --ldflags="$(CUDA_CPU_LDFLAGS)" \
		--asan="$(CUDA_CPU_ASAN)" --tsan="$(CUDA_CPU_TSAN)" --jobs=$(MAX_JOBS) && \
	end=$$(date +%s) && \
	echo "cuda-cpu: done in $$((end - start)) s (build $$((built - start)) s, runs $$((end - built)) s)"
