// __half and __nv_bfloat16 for the CPU execution model: 16-bit storage with the
// conversions of cuda_fp16.h / cuda_bf16.h (round to nearest even, NaN kept, overflow to
// infinity, subnormals exact). Arithmetic on them goes through float.
#pragma once
#include <cstdint>
#include <cstring>

namespace moe_ext {
namespace cpu_model {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Rounds `kept` (the value's bits above a cut of `shift` bits) to nearest even.
inline uint32_t round_nearest_even(uint32_t mant, int shift) {
  const uint32_t kept = mant >> shift, rest = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
  return kept + ((rest > half || (rest == half && (kept & 1))) ? 1 : 0);
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7fff;  // NaN
  if (ax == 0x7f800000u) return sign | 0x7c00;
  const int e = static_cast<int>(ax >> 23) - 127;
  if (e > 15) return sign | 0x7c00;    // overflow
  if (e < -25) return sign;            // below half the smallest subnormal: 0
  const uint32_t mant = (ax & 0x7fffff) | 0x800000;
  if (e >= -14) {  // normal: 10 mantissa bits; a carry moves into the exponent (up to inf)
    const uint32_t m = round_nearest_even(mant, 13);  // 11 bits with the implicit one
    return static_cast<uint16_t>(sign | (((e + 15) << 10) + (m - 0x400)));
  }
  // subnormal: units of 2^-24, value = mant * 2^(e - 23)
  return static_cast<uint16_t>(sign | round_nearest_even(mant, -(e + 1)));
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e == 0x1f) return bits_float(sign | 0x7f800000u | (m << 13));
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((e + 112) << 23) | (m << 13));
}

inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

inline float bf16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

}  // namespace cpu_model
}  // namespace moe_ext

struct __half {
  uint16_t __x;
  __half() = default;
  __half(float f) : __x(moe_ext::cpu_model::float_to_half_bits(f)) {}
  __half(double d) : __half(static_cast<float>(d)) {}
  operator float() const { return moe_ext::cpu_model::half_bits_to_float(__x); }
};

struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(moe_ext::cpu_model::float_to_bf16_bits(f)) {}
  __nv_bfloat16(double d) : __nv_bfloat16(static_cast<float>(d)) {}
  operator float() const { return moe_ext::cpu_model::bf16_bits_to_float(__x); }
};

struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit types");
static_assert(sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4, "packed pairs");

inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__half(lo), __half(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__nv_bfloat16(lo), __nv_bfloat16(hi)};
}
inline float __low2float(__half2 v) { return static_cast<float>(v.x); }
inline float __high2float(__half2 v) { return static_cast<float>(v.y); }
inline float __low2float(__nv_bfloat162 v) { return static_cast<float>(v.x); }
inline float __high2float(__nv_bfloat162 v) { return static_cast<float>(v.y); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) {
  __half h;
  h.__x = u;
  return h;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
  __nv_bfloat16 b;
  b.__x = u;
  return b;
}
