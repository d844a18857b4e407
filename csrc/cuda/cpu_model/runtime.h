// The CUDA runtime API subset that csrc/cuda uses, for the CPU execution model (see
// csrc/cuda/README.md): error codes, dim3, streams, cudaGetLastError, cudaMemsetAsync,
// cudaMemcpyAsync, cudaFuncSetAttribute and the device limits that launches are checked
// against. Host memory stands in for device memory; work runs synchronously.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchTimeout = 702,
  cudaErrorIllegalInstruction = 715,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace moe_ext {
namespace cpu_model {

// What a launch is checked against: the smaller of sm_80 and sm_90, the two targets of
// the build, so that a launch the model accepts runs on both.
struct DeviceLimits {
  static constexpr unsigned kMaxThreadsPerBlock = 1024;
  static constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
  static constexpr unsigned kMaxGridDim[3] = {2147483647u, 65535u, 65535u};
  static constexpr size_t kDefaultSharedPerBlock = 48 * 1024;  // without the opt-in attribute
  static constexpr size_t kMaxSharedPerBlockOptin = 166912;    // sm_80 (227 KiB on sm_90)
};

// Errors follow CUDA: launch-configuration errors are returned once by cudaGetLastError;
// a fault inside a kernel (a misuse the model detects) is sticky, as a kernel fault
// corrupts a CUDA context, until reset_device().
struct ErrorState {
  std::mutex m;
  cudaError_t last = cudaSuccess;
  cudaError_t sticky = cudaSuccess;
  std::string message;  // the model's explanation of the last error
  bool quiet = false;   // do not print faults (tests that provoke them on purpose)
};
inline ErrorState& errors() {
  static ErrorState state;
  return state;
}

inline void set_error(cudaError_t err, const std::string& message, bool sticky) {
  ErrorState& s = errors();
  std::lock_guard<std::mutex> lock(s.m);
  if (s.last == cudaSuccess) s.last = err;
  if (sticky && s.sticky == cudaSuccess) s.sticky = err;
  s.message = message;
}

inline cudaError_t sticky_error() {
  std::lock_guard<std::mutex> lock(errors().m);
  return errors().sticky;
}

// The model's explanation of the last error ("" when none).
inline std::string last_error_message() {
  std::lock_guard<std::mutex> lock(errors().m);
  return errors().message;
}

// Clears every error, as a fresh process (and a fresh CUDA context) would.
inline void reset_device() {
  std::lock_guard<std::mutex> lock(errors().m);
  errors().last = errors().sticky = cudaSuccess;
  errors().message.clear();
}

// Per kernel: the dynamic shared memory it may use (cudaFuncSetAttribute).
inline std::map<const void*, size_t>& max_dynamic_shared() {
  static std::map<const void*, size_t> m;
  return m;
}

}  // namespace cpu_model
}  // namespace moe_ext

inline cudaError_t cudaGetLastError() {
  auto& s = moe_ext::cpu_model::errors();
  std::lock_guard<std::mutex> lock(s.m);
  const cudaError_t err = s.sticky != cudaSuccess ? s.sticky : s.last;
  s.last = cudaSuccess;
  return err;
}

inline cudaError_t cudaPeekAtLastError() {
  auto& s = moe_ext::cpu_model::errors();
  std::lock_guard<std::mutex> lock(s.m);
  return s.sticky != cudaSuccess ? s.sticky : s.last;
}

inline const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchTimeout: return "the launch timed out and was terminated";
    case cudaErrorIllegalInstruction: return "an illegal instruction was encountered";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return moe_ext::cpu_model::sticky_error(); }
inline cudaError_t cudaDeviceSynchronize() { return moe_ext::cpu_model::sticky_error(); }

inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t = nullptr) {
  if (cudaError_t err = moe_ext::cpu_model::sticky_error()) return err;
  if (bytes > 0 && ptr == nullptr) {
    moe_ext::cpu_model::set_error(cudaErrorInvalidValue, "cudaMemsetAsync on a null pointer", false);
    return cudaErrorInvalidValue;
  }
  if (bytes > 0) std::memset(ptr, value, bytes);
  return cudaSuccess;
}

inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                                   cudaStream_t = nullptr) {
  if (cudaError_t err = moe_ext::cpu_model::sticky_error()) return err;
  if (bytes > 0 && (dst == nullptr || src == nullptr)) {
    moe_ext::cpu_model::set_error(cudaErrorInvalidValue, "cudaMemcpyAsync with a null pointer", false);
    return cudaErrorInvalidValue;
  }
  if (bytes > 0) std::memmove(dst, src, bytes);
  return cudaSuccess;
}

// Only cudaFuncAttributeMaxDynamicSharedMemorySize is modelled: launches with more than
// 48 KiB of dynamic shared memory need it, as on a GPU.
template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  using moe_ext::cpu_model::DeviceLimits;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > DeviceLimits::kMaxSharedPerBlockOptin) {
    moe_ext::cpu_model::set_error(
        cudaErrorInvalidValue,
        "cudaFuncSetAttribute: dynamic shared memory " + std::to_string(value) +
            " bytes is over the limit of " + std::to_string(DeviceLimits::kMaxSharedPerBlockOptin),
        false);
    return cudaErrorInvalidValue;
  }
  moe_ext::cpu_model::max_dynamic_shared()[reinterpret_cast<const void*>(kernel)] =
      static_cast<size_t>(value);
  return cudaSuccess;
}
