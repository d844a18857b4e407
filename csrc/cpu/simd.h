// CPU code generation helpers. The wheel is built for baseline x86-64, so hot loops are
// compiled three times (AVX-512, AVX2+FMA, baseline) and the loader picks the best clone
// for the running CPU (GCC function multi-versioning). The sanitizer build (setup.py,
// MOE_EXT_SANITIZE=1) defines MOE_EXT_NO_SIMD_CLONES: one copy of the same source compiles
// three times faster, and bounds do not depend on the instruction set.
#pragma once
#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(MOE_EXT_NO_SIMD_CLONES)
#define MOE_EXT_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOE_EXT_SIMD_CLONES
#endif

// Helpers called from a cloned kernel must be inlined into it to be compiled for the
// clone's instruction set; an out-of-line helper would run the baseline code.
#define MOE_EXT_INLINE inline __attribute__((always_inline))

namespace moe_ext {
namespace cpu {

// Work splitting: at::parallel_for grain sizes that keep per-task overhead small.
constexpr int64_t kTokenGrain = 16;

// Checks that every expert id lies in [0, num_ids); returns the first bad one or -1.
inline int64_t first_bad_expert_id(const int64_t* ids, int64_t n, int64_t num_ids) {
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= num_ids) return i;
  }
  return -1;
}

}  // namespace cpu
}  // namespace moe_ext
