// The small part of PyTorch that the host code uses, on the LibTorch stable ABI only
// (torch/csrc/stable, torch/headeronly): one build runs on every torch >= 2.10
// (setup.py compiles with TORCH_TARGET_VERSION=2.10 and TORCH_STABLE_ONLY, so any
// non-stable torch header is a compile error).
//
// Errors: MOE_CHECK_VALUE throws std::invalid_argument (Python ValueError) for shapes and
// values, MOE_CHECK std::runtime_error (RuntimeError) for dtypes and devices. Never throw
// inside parallel_for: an exception crossing the stable C boundary there loses its type, so
// the kernels record a failure and the host code throws after the loop.
#pragma once
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>  // parallel_for, get_num_threads, fill_
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace moe_ext {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Device = torch::stable::Device;
using Sizes = std::vector<int64_t>;
using BFloat16 = torch::headeronly::BFloat16;
using Half = torch::headeronly::Half;

constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kDouble = ScalarType::Double;
constexpr ScalarType kHalf = ScalarType::Half;
constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
constexpr ScalarType kLong = ScalarType::Long;
constexpr ScalarType kInt = ScalarType::Int;
constexpr ScalarType kBool = ScalarType::Bool;

// ---- messages -------------------------------------------------------------------------

// "[2, 3]", as torch prints sizes.
inline std::string shape_of(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// "cpu", "cuda:0", as torch prints devices.
inline std::string device_of(const Tensor& t) {
  const Device d = t.device();
  std::string s;
  switch (d.type()) {
    case torch::headeronly::DeviceType::CPU: s = "cpu"; break;
    case torch::headeronly::DeviceType::CUDA: s = "cuda"; break;
    case torch::headeronly::DeviceType::Meta: s = "meta"; break;
    default: s = "device type " + std::to_string(static_cast<int>(d.type()));
  }
  return d.has_index() ? s + ":" + std::to_string(d.index()) : s;
}

inline bool same_shape(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t i = 0; i < a.dim(); ++i)
    if (a.size(i) != b.size(i)) return false;
  return true;
}

template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

#define MOE_CHECK_VALUE(cond, ...)                                           \
  do {                                                                       \
    if (!(cond)) throw std::invalid_argument(::moe_ext::str_cat(__VA_ARGS__)); \
  } while (0)
#define MOE_CHECK(cond, ...)                                                \
  do {                                                                      \
    if (!(cond)) throw std::runtime_error(::moe_ext::str_cat(__VA_ARGS__)); \
  } while (0)

// ---- dtype dispatch -------------------------------------------------------------------

// f(scalar_t{}) for the floating dtypes (double, float, bf16, fp16 with `low_precision`).
template <typename F>
void dispatch_floating(ScalarType t, const char* name, F&& f, bool low_precision = true) {
  switch (t) {
    case ScalarType::Double: f(double{}); return;
    case ScalarType::Float: f(float{}); return;
    case ScalarType::BFloat16: if (low_precision) { f(BFloat16{}); return; } break;
    case ScalarType::Half: if (low_precision) { f(Half{}); return; } break;
    default: break;
  }
  throw std::runtime_error(str_cat(name, " not implemented for '", t, "'"));
}

// ---- tensor helpers -------------------------------------------------------------------
// aten ops called by name through the stable dispatcher entry point (torch_call_dispatcher,
// in every torch >= 2.10), rather than torch::stable's C++ wrappers: those appeared over
// several releases (permute only in 2.14's headers), and these build against any torch's
// headers >= 2.10. Qualified calls (aten::view, ...) also keep argument-dependent lookup from
// picking torch::stable's namesakes. Each costs about a microsecond of host time.

namespace aten {
namespace detail {
using torch::stable::detail::from;

// Runs aten::<name>.<overload> on the boxed arguments; returns output `out`.
template <size_t N>
Tensor call(const char* name, const char* overload, std::array<StableIValue, N> stack,
            size_t out = 0) {
  STABLE_TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[out]);
}
}  // namespace detail

using detail::from;
using IntList = torch::headeronly::IntHeaderOnlyArrayRef;
constexpr std::nullopt_t none = std::nullopt;

inline Tensor empty(const Sizes& sizes, ScalarType dtype, const Device& device) {
  return detail::call<6>("aten::empty", "memory_format",
                         {from(IntList(sizes)), from(std::optional<ScalarType>(dtype)), from(none),
                          from(std::optional<Device>(device)), from(none), from(none)});
}

inline Tensor empty_like(const Tensor& t) {
  return detail::call<6>("aten::empty_like", "",
                         {from(t), from(none), from(none), from(none), from(none), from(none)});
}

inline void zero_(const Tensor& t) { detail::call<1>("aten::zero_", "", {from(t)}); }

inline Tensor zeros(const Sizes& sizes, ScalarType dtype, const Device& device) {
  Tensor t = aten::empty(sizes, dtype, device);
  aten::zero_(t);
  return t;
}

inline Tensor zeros_like(const Tensor& t) {
  Tensor z = aten::empty_like(t);
  aten::zero_(z);
  return z;
}

// t itself when it already has the dtype (no copy).
inline Tensor to(const Tensor& t, ScalarType dtype) {
  return detail::call<8>("aten::to", "dtype_layout",
                         {from(t), from(std::optional<ScalarType>(dtype)), from(none), from(none),
                          from(none), from(false), from(false), from(none)});
}

inline Tensor to_cpu(const Tensor& t) {
  const Device cpu(torch::headeronly::DeviceType::CPU);
  return detail::call<8>("aten::to", "dtype_layout",
                         {from(t), from(none), from(none), from(std::optional<Device>(cpu)),
                          from(none), from(false), from(false), from(none)});
}

inline Tensor contiguous(const Tensor& t) {
  return detail::call<2>("aten::contiguous", "",
                         {from(t), from(torch::headeronly::MemoryFormat::Contiguous)});
}

inline Tensor permute(const Tensor& t, const Sizes& dims) {
  return detail::call<2>("aten::permute", "", {from(t), from(IntList(dims))});
}

inline Tensor reshape(const Tensor& t, const Sizes& sizes) {
  return detail::call<2>("aten::reshape", "", {from(t), from(IntList(sizes))});
}

inline Tensor view(const Tensor& t, const Sizes& sizes) {
  return detail::call<2>("aten::view", "", {from(t), from(IntList(sizes))});
}

inline Tensor transpose(const Tensor& t, int64_t a, int64_t b) {
  return detail::call<3>("aten::transpose", "int", {from(t), from(a), from(b)});
}

// A 2-D tensor's transpose (a view).
inline Tensor t2(const Tensor& t) { return aten::transpose(t, 0, 1); }

inline Tensor narrow(const Tensor& t, int64_t dim, int64_t start, int64_t length) {
  return detail::call<4>("aten::narrow", "", {from(t), from(dim), from(start), from(length)});
}

inline void copy_(const Tensor& dst, const Tensor& src) {
  detail::call<3>("aten::copy_", "", {from(dst), from(src), from(false)});
}

// Matrix product of 2-D tensors of one dtype (BLAS / cuBLAS).
inline Tensor mm(const Tensor& a, const Tensor& b) {
  return detail::call<2>("aten::mm", "", {from(a), from(b)});
}

// min(max(t, lo), hi): aten::clamp with 0-d tensor bounds (no Scalar crosses the stable ABI
// of torch 2.10).
inline Tensor clamp(const Tensor& t, int64_t lo, int64_t hi) {
  Tensor lo_t = aten::empty({}, t.scalar_type(), t.device()), hi_t = aten::empty({}, t.scalar_type(), t.device());
  torch::stable::fill_(lo_t, double(lo));
  torch::stable::fill_(hi_t, double(hi));
  return detail::call<3>("aten::clamp", "Tensor", {from(t), from(std::optional<Tensor>(lo_t)),
                                                    from(std::optional<Tensor>(hi_t))});
}

// The running maximum of a 1-D tensor (aten::cummax's values).
inline Tensor cummax_values(const Tensor& t) {
  return detail::call<2>("aten::cummax", "", {from(t), from(int64_t(0))});
}

}  // namespace aten
}  // namespace moe_ext
