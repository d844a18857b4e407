// Small SIMD building blocks for the CPU LoRA kernels, written with GCC vector types so
// that each ISA clone of a kernel (simd.h) compiles them for its own registers.
// All are MOE_EXT_INLINE: they must be inlined into the cloned kernel that calls them.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd.h"

namespace moe_ext {
namespace cpu {

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename T>
struct Vec {  // 32 bytes: one AVX2 register, two SSE registers
  typedef T type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 32 / sizeof(T);
};

template <typename acc_t, typename scalar_t>
MOE_EXT_INLINE typename Vec<acc_t>::type load_vec(const scalar_t* p) {
  typename Vec<acc_t>::type v;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int64_t i = 0; i < Vec<acc_t>::lanes; ++i) v[i] = static_cast<acc_t>(p[i]);
  }
  return v;
}

template <typename acc_t>
MOE_EXT_INLINE void store_vec(acc_t* p, typename Vec<acc_t>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename acc_t>
MOE_EXT_INLINE acc_t hsum(typename Vec<acc_t>::type v) {
  acc_t s = 0;
  for (int64_t i = 0; i < Vec<acc_t>::lanes; ++i) s += v[i];
  return s;
}

// out[r] += dot(rows[r * stride : + n], v[:n]) for r < R.
template <typename acc_t, typename a_t, typename v_t>
MOE_EXT_INLINE void dots_x1(const a_t* rows, int64_t stride, const v_t* v, int64_t R, int64_t n,
                            acc_t* out) {
  for (int64_t r = 0; r < R; ++r) {
    const a_t* a = rows + r * stride;
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += static_cast<acc_t>(a[i]) * static_cast<acc_t>(v[i]);
    out[r] += s;
  }
}

// Two vectors at once, sharing each load of `rows`:
// out0[r] += dot(rows[r], v0), out1[r] += dot(rows[r], v1) for r < R.
template <typename acc_t, typename a_t, typename v_t>
MOE_EXT_INLINE void dots_x2(const a_t* rows, int64_t stride, const v_t* v0, const v_t* v1,
                            int64_t R, int64_t n, acc_t* out0, acc_t* out1) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = Vec<acc_t>::lanes;
  const int64_t nv = n - n % L;
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    const a_t *a0 = rows + r * stride, *a1 = a0 + stride, *a2 = a1 + stride, *a3 = a2 + stride;
    V s00 = {}, s01 = {}, s02 = {}, s03 = {}, s10 = {}, s11 = {}, s12 = {}, s13 = {};
    for (int64_t i = 0; i < nv; i += L) {
      const V x0 = load_vec<acc_t>(v0 + i), x1 = load_vec<acc_t>(v1 + i);
      const V b0 = load_vec<acc_t>(a0 + i), b1 = load_vec<acc_t>(a1 + i);
      const V b2 = load_vec<acc_t>(a2 + i), b3 = load_vec<acc_t>(a3 + i);
      s00 += b0 * x0; s01 += b1 * x0; s02 += b2 * x0; s03 += b3 * x0;
      s10 += b0 * x1; s11 += b1 * x1; s12 += b2 * x1; s13 += b3 * x1;
    }
    acc_t t0[4] = {hsum<acc_t>(s00), hsum<acc_t>(s01), hsum<acc_t>(s02), hsum<acc_t>(s03)};
    acc_t t1[4] = {hsum<acc_t>(s10), hsum<acc_t>(s11), hsum<acc_t>(s12), hsum<acc_t>(s13)};
    for (int64_t i = nv; i < n; ++i) {
      const acc_t x0 = static_cast<acc_t>(v0[i]), x1 = static_cast<acc_t>(v1[i]);
      const acc_t b[4] = {static_cast<acc_t>(a0[i]), static_cast<acc_t>(a1[i]),
                          static_cast<acc_t>(a2[i]), static_cast<acc_t>(a3[i])};
      for (int q = 0; q < 4; ++q) {
        t0[q] += b[q] * x0;
        t1[q] += b[q] * x1;
      }
    }
    for (int q = 0; q < 4; ++q) {
      out0[r + q] += t0[q];
      out1[r + q] += t1[q];
    }
  }
  if (r < R) {
    dots_x1(rows + r * stride, stride, v0, R - r, n, out0 + r);
    dots_x1(rows + r * stride, stride, v1, R - r, n, out1 + r);
  }
}

// acc[:n] += sum_r c[r] * rows[r * stride : + n].
template <typename acc_t, typename a_t>
MOE_EXT_INLINE void axpys_x1(acc_t* acc, const acc_t* c, const a_t* rows, int64_t stride,
                             int64_t R, int64_t n) {
  for (int64_t r = 0; r < R; ++r) {
    const a_t* a = rows + r * stride;
    const acc_t cr = c[r];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] += cr * static_cast<acc_t>(a[i]);
  }
}

// Two accumulators at once, sharing each load of `rows`, held in registers over all R:
// acc0[:n] += sum_r c0[r] rows[r, :n]; acc1[:n] += sum_r c1[r] rows[r, :n].
// Even and odd r go to separate registers (8 independent FMA chains hide FMA latency).
template <typename acc_t, typename a_t>
MOE_EXT_INLINE void axpys_x2(acc_t* acc0, acc_t* acc1, const acc_t* c0, const acc_t* c1,
                             const a_t* rows, int64_t stride, int64_t R, int64_t n) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = Vec<acc_t>::lanes;
  const int64_t nv = n - n % (2 * L);
  for (int64_t i = 0; i < nv; i += 2 * L) {
    V y00 = load_vec<acc_t>(acc0 + i), y01 = load_vec<acc_t>(acc0 + i + L);
    V y10 = load_vec<acc_t>(acc1 + i), y11 = load_vec<acc_t>(acc1 + i + L);
    V z00 = {}, z01 = {}, z10 = {}, z11 = {};
    int64_t r = 0;
    for (; r + 2 <= R; r += 2) {
      const a_t* a = rows + r * stride + i;
      const V b0 = load_vec<acc_t>(a), b1 = load_vec<acc_t>(a + L);
      const V d0 = load_vec<acc_t>(a + stride), d1 = load_vec<acc_t>(a + stride + L);
      y00 += c0[r] * b0; y01 += c0[r] * b1;
      y10 += c1[r] * b0; y11 += c1[r] * b1;
      z00 += c0[r + 1] * d0; z01 += c0[r + 1] * d1;
      z10 += c1[r + 1] * d0; z11 += c1[r + 1] * d1;
    }
    if (r < R) {
      const a_t* a = rows + r * stride + i;
      const V b0 = load_vec<acc_t>(a), b1 = load_vec<acc_t>(a + L);
      y00 += c0[r] * b0; y01 += c0[r] * b1;
      y10 += c1[r] * b0; y11 += c1[r] * b1;
    }
    store_vec<acc_t>(acc0 + i, y00 + z00); store_vec<acc_t>(acc0 + i + L, y01 + z01);
    store_vec<acc_t>(acc1 + i, y10 + z10); store_vec<acc_t>(acc1 + i + L, y11 + z11);
  }
  if (nv < n) {
    axpys_x1(acc0 + nv, c0, rows + nv, stride, R, n - nv);
    axpys_x1(acc1 + nv, c1, rows + nv, stride, R, n - nv);
  }
}

}  // namespace cpu
}  // namespace moe_ext
