// The test harness of `make test-cuda-cpu`: a case registry, device buffers (host memory
// in the CPU execution model, poisoned like fresh device memory), conversions between
// double and the storage types, and comparisons against float64 references.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_api.cuh"
#include "launchers.h"

namespace cuda_cpu {

using moe_ext::cuda::DType;

struct Case {
  std::string name;
  std::string tags;  // "tsan": also in the ThreadSanitizer subset
  std::function<void()> run;
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

struct Register {
  Register(std::string name, std::string tags, std::function<void()> run) {
    registry().push_back({std::move(name), std::move(tags), std::move(run)});
  }
};

#define CUDA_CPU_CONCAT2(a, b) a##b
#define CUDA_CPU_CONCAT(a, b) CUDA_CPU_CONCAT2(a, b)
// CUDA_CPU_CASE("route/basic", "tsan", [] { ... });
#define CUDA_CPU_CASE(name, tags, ...) \
  static ::cuda_cpu::Register CUDA_CPU_CONCAT(case_, __COUNTER__)(name, tags, __VA_ARGS__)

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  throw Failure(s.str());
}

template <typename... Parts>
void check(bool ok, const Parts&... parts) {
  if (!ok) fail(parts...);
}

// A launcher's error, with the model's explanation.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    fail(what, ": ", cudaGetErrorString(err), " (", moe_ext::cpu_model::last_error_message(), ")");
}

// Device memory: every buffer its own allocation (so ASan sees overruns), filled with 0xff
// bytes like at::empty's garbage (NaN for floats, -1 for integers) or zeros like at::zeros.
class Buffer {
 public:
  Buffer() = default;
  Buffer(size_t bytes, bool zero) : bytes_(bytes), data_(new unsigned char[bytes ? bytes : 1]) {
    std::memset(data_.get(), zero ? 0 : 0xff, bytes);
  }
  void* get() const { return bytes_ ? data_.get() : nullptr; }
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_ = 0;
  std::shared_ptr<unsigned char[]> data_;
};

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat64: return 8;
    case DType::kFloat32: return 4;
    default: return 2;
  }
}
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat64: return "f64";
    case DType::kFloat32: return "f32";
    case DType::kFloat16: return "f16";
    default: return "bf16";
  }
}
inline DType acc_of(DType t) { return t == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32; }

// Values of `dtype` in a fresh buffer.
inline Buffer to_device(const std::vector<double>& v, DType t) {
  Buffer b(v.size() * dtype_size(t), false);
  for (size_t i = 0; i < v.size(); ++i) {
    switch (t) {
      case DType::kFloat64: static_cast<double*>(b.get())[i] = v[i]; break;
      case DType::kFloat32: static_cast<float*>(b.get())[i] = static_cast<float>(v[i]); break;
      case DType::kFloat16: static_cast<__half*>(b.get())[i] = __half(static_cast<float>(v[i])); break;
      case DType::kBFloat16:
        static_cast<__nv_bfloat16*>(b.get())[i] = __nv_bfloat16(static_cast<float>(v[i]));
        break;
    }
  }
  return b;
}

inline std::vector<double> to_host(const Buffer& b, DType t, size_t n) {
  check(b.bytes() >= n * dtype_size(t), "buffer smaller than ", n, " elements");
  std::vector<double> v(n);
  for (size_t i = 0; i < n; ++i) {
    switch (t) {
      case DType::kFloat64: v[i] = static_cast<const double*>(b.get())[i]; break;
      case DType::kFloat32: v[i] = static_cast<const float*>(b.get())[i]; break;
      case DType::kFloat16: v[i] = static_cast<float>(static_cast<const __half*>(b.get())[i]); break;
      case DType::kBFloat16:
        v[i] = static_cast<float>(static_cast<const __nv_bfloat16*>(b.get())[i]);
        break;
    }
  }
  return v;
}

// The values as `t` stores them (what the kernels read), back in double.
inline std::vector<double> rounded(const std::vector<double>& v, DType t) {
  return to_host(to_device(v, t), t, v.size());
}

inline Buffer ints_to_device(const std::vector<int64_t>& v) {
  Buffer b(v.size() * 8, false);
  if (!v.empty()) std::memcpy(b.get(), v.data(), v.size() * 8);
  return b;
}
inline std::vector<int64_t> ints_to_host(const Buffer& b, size_t n) {
  std::vector<int64_t> v(n);
  if (n) std::memcpy(v.data(), b.get(), n * 8);
  return v;
}

inline std::vector<double> randn(size_t n, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal;
  std::vector<double> v(n);
  for (auto& x : v) x = normal(gen) * scale;
  return v;
}

// Tolerances per dtype (relative to the magnitude of the reference): accumulation in
// float64 / float32 and one rounding of the result to the dtype.
inline double tolerance(DType t) {
  switch (t) {
    case DType::kFloat64: return 1e-12;
    case DType::kFloat32: return 2e-5;
    case DType::kFloat16: return 2e-3;
    default: return 1.6e-2;
  }
}

// |got - want| <= tol * (|want| + max|want|) + atol, element by element; NaN fails.
inline void expect_close(const std::string& what, const std::vector<double>& got,
                         const std::vector<double>& want, double tol, double atol = 0) {
  check(got.size() == want.size(), what, ": ", got.size(), " values, want ", want.size());
  double scale = 0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]);
    if (!(err <= tol * (std::fabs(want[i]) + scale) + atol))
      fail(what, ": element ", i, " is ", got[i], ", want ", want[i], " (tolerance ", tol, ")");
  }
}

template <typename T>
void expect_equal(const std::string& what, const std::vector<T>& got, const std::vector<T>& want) {
  check(got.size() == want.size(), what, ": ", got.size(), " values, want ", want.size());
  for (size_t i = 0; i < got.size(); ++i)
    if (!(got[i] == want[i])) fail(what, ": element ", i, " is ", got[i], ", want ", want[i]);
}

// Runs f() expecting a kernel fault whose message contains `needle` (the model prints
// nothing meanwhile), then clears the sticky error.
inline void expect_fault(const std::string& needle, const std::function<void()>& f) {
  auto& errs = moe_ext::cpu_model::errors();
  errs.quiet = true;
  f();
  errs.quiet = false;
  const cudaError_t err = cudaGetLastError();
  const std::string msg = moe_ext::cpu_model::last_error_message();
  moe_ext::cpu_model::reset_device();
  check(err != cudaSuccess, "expected a fault containing '", needle, "', got none");
  check(msg.find(needle) != std::string::npos, "expected a fault containing '", needle,
        "', got: ", msg);
}

}  // namespace cuda_cpu
