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

#include <algorithm>
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
// The few tensor operations the host code needs, in namespace aten so that qualified calls
// (aten::view, ...) keep argument-dependent lookup off torch::stable's namesakes. Allocation,
// views, copies and zeroing go straight to the AOTI C shim (aoti_torch_empty_strided,
// aoti_torch__reinterpret_tensor, aoti_torch_copy_, aoti_torch_zero_): a fraction of a
// microsecond each, where a boxed dispatcher call costs a few. The rest (mm, clamp, cummax)
// calls aten by name through torch_call_dispatcher, in every torch >= 2.10, rather than
// torch::stable's C++ wrappers, which appeared over several releases (permute only in 2.14's
// headers): these build against any torch's headers >= 2.10. Allocations are contiguous;
// reshape of a non-contiguous tensor copies it first (as aten's would); view needs a
// contiguous one.

namespace aten {
namespace detail {
using torch::stable::detail::from;

// Runs aten::<name>.<overload> on the boxed arguments; returns output 0.
template <size_t N>
Tensor call(const char* name, const char* overload, std::array<StableIValue, N> stack) {
  STABLE_TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

inline Sizes strides_of(const Tensor& t) {
  const auto s = t.strides();
  return Sizes(s.begin(), s.end());
}

inline Sizes sizes_of(const Tensor& t) {
  const auto s = t.sizes();
  return Sizes(s.begin(), s.end());
}

// Row-major strides of `sizes`.
inline Sizes contiguous_strides(const Sizes& sizes) {
  Sizes strides(sizes.size());
  int64_t step = 1;
  for (size_t i = sizes.size(); i-- > 0;) {
    strides[i] = step;
    step *= std::max<int64_t>(sizes[i], 1);
  }
  return strides;
}

// A view of t's storage with the given sizes, strides and storage offset.
inline Tensor restride(const Tensor& t, const Sizes& sizes, const Sizes& strides, int64_t offset) {
  AtenTensorHandle out = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch__reinterpret_tensor(
      t.get(), static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), offset, &out));
  return Tensor(out);
}
}  // namespace detail

using detail::from;
using IntList = torch::headeronly::IntHeaderOnlyArrayRef;
constexpr std::nullopt_t none = std::nullopt;

// A new contiguous tensor.
inline Tensor empty(const Sizes& sizes, ScalarType dtype, const Device& device) {
  const Sizes strides = detail::contiguous_strides(sizes);
  const auto code = [](auto v) { return torch::stable::detail::to<int32_t>(from(v)); };
  AtenTensorHandle out = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(
      static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), code(dtype),
      code(device.type()), device.index(), &out));
  return Tensor(out);
}

inline Tensor empty_like(const Tensor& t) {
  return aten::empty(detail::sizes_of(t), t.scalar_type(), t.device());
}

inline void zero_(const Tensor& t) { STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_zero_(t.get())); }

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

// dst[...] = src (broadcast and dtype conversion as Tensor.copy_).
inline void copy_(const Tensor& dst, const Tensor& src) {
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_copy_(dst.get(), src.get(), /*non_blocking=*/0));
}

// t itself when it is contiguous, else a contiguous copy.
inline Tensor contiguous(const Tensor& t) {
  if (t.is_contiguous()) return t;
  Tensor out = aten::empty_like(t);
  aten::copy_(out, t);
  return out;
}

// t itself when it already has the dtype, else a contiguous converted copy.
inline Tensor to(const Tensor& t, ScalarType dtype) {
  if (t.scalar_type() == dtype) return t;
  Tensor out = aten::empty(detail::sizes_of(t), dtype, t.device());
  aten::copy_(out, t);
  return out;
}

// A host copy (the CUDA debug checks read it).
inline Tensor to_cpu(const Tensor& t) {
  Tensor out =
      aten::empty(detail::sizes_of(t), t.scalar_type(), Device(torch::headeronly::DeviceType::CPU));
  aten::copy_(out, t);
  return out;
}

inline Tensor permute(const Tensor& t, const Sizes& dims) {
  const Sizes sizes = detail::sizes_of(t), strides = detail::strides_of(t);
  MOE_CHECK(dims.size() == sizes.size(), "permute: ", dims.size(), " dims for a ", sizes.size(),
            "-D tensor");
  Sizes new_sizes, new_strides;
  for (int64_t d : dims) {
    new_sizes.push_back(sizes.at(d));
    new_strides.push_back(strides.at(d));
  }
  return detail::restride(t, new_sizes, new_strides, t.storage_offset());
}

inline Tensor transpose(const Tensor& t, int64_t a, int64_t b) {
  Sizes dims(t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) dims[i] = i;
  std::swap(dims.at(a), dims.at(b));
  return aten::permute(t, dims);
}

// A 2-D tensor's transpose (a view).
inline Tensor t2(const Tensor& t) { return aten::transpose(t, 0, 1); }

inline Tensor narrow(const Tensor& t, int64_t dim, int64_t start, int64_t length) {
  Sizes sizes = detail::sizes_of(t);
  const Sizes strides = detail::strides_of(t);
  MOE_CHECK(start >= 0 && length >= 0 && start + length <= sizes.at(dim), "narrow: [", start,
            ", ", start + length, ") is outside dim ", dim, " of size ", sizes.at(dim));
  sizes[dim] = length;
  return detail::restride(t, sizes, strides, t.storage_offset() + start * strides[dim]);
}

// The same elements in a new shape: a view of a contiguous t, else a contiguous copy.
inline Tensor reshape(const Tensor& t, const Sizes& sizes) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  MOE_CHECK(n == t.numel(), "reshape: ", t.numel(), " elements cannot take shape of ", n);
  const Tensor c = aten::contiguous(t);
  return detail::restride(c, sizes, detail::contiguous_strides(sizes), c.storage_offset());
}

// A view of a contiguous t in a new shape.
inline Tensor view(const Tensor& t, const Sizes& sizes) {
  MOE_CHECK(t.is_contiguous(), "view: the tensor must be contiguous");
  return aten::reshape(t, sizes);
}

// Matrix product of 2-D tensors of one dtype (BLAS / cuBLAS).
inline Tensor mm(const Tensor& a, const Tensor& b) {
  return detail::call<2>("aten::mm", "", {from(a), from(b)});
}

// min(max(t, lo), hi): aten::clamp with 0-d tensor bounds (no Scalar crosses the stable ABI
// of torch 2.10).
inline Tensor clamp(const Tensor& t, int64_t lo, int64_t hi) {
  Tensor lo_t = aten::empty({}, t.scalar_type(), t.device()),
         hi_t = aten::empty({}, t.scalar_type(), t.device());
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
