// Host-side helpers of the CUDA ops (*_cuda.cpp), on the stable ABI: dtype mapping to the
// launchers' DType, the device guard and current stream, launch error checks and the
// optional debug checks.
#pragma once
#include <cuda_runtime_api.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>

#include <cstdlib>
#include <cstring>

#include "../checks.h"
#include "launchers.h"

namespace moe_ext {
namespace cuda {

// A failed launch or CUDA call: RuntimeError with CUDA's message (torch's wording).
#define MOE_CUDA_CHECK(EXPR) STD_CUDA_CHECK(EXPR)

inline DType dtype_of(ScalarType t) {
  switch (t) {
    case kDouble: return DType::kFloat64;
    case kFloat: return DType::kFloat32;
    case kHalf: return DType::kFloat16;
    case kBFloat16: return DType::kBFloat16;
    default: throw std::runtime_error(str_cat("moe_ext CUDA kernels do not support dtype ", t));
  }
}

// Makes t's device current while the returned guard lives (c10::cuda::CUDAGuard's job).
inline torch::stable::accelerator::DeviceGuard device_guard(const Tensor& t) {
  return torch::stable::accelerator::DeviceGuard(t.get_device_index());
}

// The current stream of the current device (torch's, so the ops order with everything else).
inline cudaStream_t current_stream() {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(
      torch::stable::accelerator::getCurrentDeviceIndex(), &stream));
  return static_cast<cudaStream_t>(stream);
}

inline int current_device() { return torch::stable::accelerator::getCurrentDeviceIndex(); }

// MOE_EXT_DEBUG=1 turns on the data checks that need a host synchronisation (non-finite
// logits, out-of-range expert ids). Off by default: they would break CUDA-graph capture.
inline bool debug_checks() {
  const char* v = std::getenv("MOE_EXT_DEBUG");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// Debug mode only: every id in [0, num_ids) (a host copy, read here).
inline void debug_check_ids(const Tensor& ids, int64_t num_ids, const char* name) {
  if (!debug_checks() || ids.numel() == 0) return;
  const Tensor host = aten::to_cpu(aten::contiguous(ids));
  const int64_t* p = host.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < host.numel(); ++i)
    MOE_CHECK_VALUE(p[i] >= 0 && p[i] < num_ids, name, " holds an id outside [0, ", num_ids, ")");
}

// Debug mode only: every value finite (a float64 host copy, read here).
inline void debug_check_finite(const Tensor& t, const char* what) {
  if (!debug_checks() || t.numel() == 0) return;
  const Tensor host = aten::to_cpu(aten::contiguous(aten::to(t, kDouble)));
  const double* p = host.const_data_ptr<double>();
  for (int64_t i = 0; i < host.numel(); ++i)
    MOE_CHECK_VALUE(std::isfinite(p[i]), what, " contains non-finite values (NaN or Inf)");
}

// Grouped kernels put column blocks of 128 on the grid's y axis (at most 65535 blocks).
inline void check_columns(int64_t n, const char* what) {
  MOE_CHECK_VALUE(n <= int64_t(65535) * 128, what, " = ", n, " is too large for the CUDA kernels");
}

// The kernels index with 32-bit counters in places (pair counts, row widths).
inline void check_int32_range(int64_t n, const char* what) {
  MOE_CHECK_VALUE(n < (int64_t(1) << 31), what, " = ", n, " is too large for the CUDA kernels");
}

// The align op (align_cuda.cpp) and its launch without the debug id check, for the LoRA
// ops: ids outside [0, num_bins) are counted in the last bin. Sizes are always checked.
std::tuple<Tensor, Tensor> align_cuda(const Tensor& experts, int64_t num_bins);
std::tuple<Tensor, Tensor> align_unchecked_ids(const Tensor& experts, int64_t num_bins);

}  // namespace cuda
}  // namespace moe_ext
