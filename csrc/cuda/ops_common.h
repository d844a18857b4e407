// Host-side helpers of the CUDA ops (*_cuda.cpp): dtype mapping to the launchers' DType,
// the current stream, launch error checks and the optional debug checks.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>

#include "../checks.h"
#include "launchers.h"

namespace moe_ext {
namespace cuda {

inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return DType::kFloat64;
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "moe_ext CUDA kernels do not support dtype ", t);
  }
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// MOE_EXT_DEBUG=1 turns on the data checks that need a host synchronisation (non-finite
// logits, out-of-range expert ids). Off by default: they would break CUDA-graph capture.
inline bool debug_checks() {
  const char* v = std::getenv("MOE_EXT_DEBUG");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// Debug mode only: every id in [0, num_ids).
inline void debug_check_ids(const at::Tensor& ids, int64_t num_ids, const char* name) {
  if (!debug_checks() || ids.numel() == 0) return;
  const bool ok = ((ids >= 0) & (ids < num_ids)).all().item<bool>();
  TORCH_CHECK_VALUE(ok, name, " holds an id outside [0, ", num_ids, ")");
}

// Grouped kernels put column blocks of 128 on the grid's y axis (at most 65535 blocks).
inline void check_columns(int64_t n, const char* what) {
  TORCH_CHECK_VALUE(n <= int64_t(65535) * 128, what, " = ", n, " is too large for the CUDA kernels");
}

// The kernels index with 32-bit counters in places (pair counts, row widths).
inline void check_int32_range(int64_t n, const char* what) {
  TORCH_CHECK_VALUE(n < (int64_t(1) << 31), what, " = ", n, " is too large for the CUDA kernels");
}

// The align op (align_cuda.cpp) and its launch without the debug id check, for the LoRA
// ops: ids outside [0, num_bins) are counted in the last bin. Sizes are always checked.
std::tuple<at::Tensor, at::Tensor> align_cuda(const at::Tensor& experts, int64_t num_bins);
std::tuple<at::Tensor, at::Tensor> align_unchecked_ids(const at::Tensor& experts,
                                                       int64_t num_bins);

}  // namespace cuda
}  // namespace moe_ext
