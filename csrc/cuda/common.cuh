// Device helpers shared by the kernels: accumulation types and conversions, warp
// reductions, dtype dispatch and launch geometry. Plain CUDA, no torch headers; the CUDA
// headers (or the CPU execution model) come through cuda_api.cuh.
#pragma once
#include <cstdint>
#include <limits>

#include "cuda_api.cuh"
#include "launchers.h"

namespace moe_ext {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Accumulation type: double for double, float for everything else.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_of = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// from_acc<T>(v): round-to-nearest conversion from the accumulation type.
template <typename T> struct FromAcc;
template <> struct FromAcc<float> { __device__ static float cvt(float v) { return v; } };
template <> struct FromAcc<double> { __device__ static double cvt(double v) { return v; } };
template <> struct FromAcc<__half> { __device__ static __half cvt(float v) { return __float2half_rn(v); } };
template <> struct FromAcc<__nv_bfloat16> {
  __device__ static __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
};
template <typename T>
__device__ __forceinline__ T from_acc(acc_of<T> v) { return FromAcc<T>::cvt(v); }

__device__ __forceinline__ float acc_exp(float v) { return expf(v); }
__device__ __forceinline__ double acc_exp(double v) { return exp(v); }

// Butterfly reductions: every lane ends with the same, bitwise identical, value (each step
// adds the same two operands on both partner lanes).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Is e a LoRA expert id (0 <= e < E)? Anything else (null experts, bad ids) adds nothing.
__device__ __forceinline__ bool is_lora(int64_t e, int64_t E) {
  return static_cast<uint64_t>(e) < static_cast<uint64_t>(E);
}

// Calls f(scalar_t{}) for the storage type of `dtype`.
template <typename F>
void dispatch_all(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat64: f(double{}); break;
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}
// The accumulation types only (float64, float32).
template <typename F>
void dispatch_acc(DType dtype, F&& f) {
  if (dtype == DType::kFloat64) f(double{}); else f(float{});
}

inline unsigned blocks_for(int64_t n, int64_t per_block) {
  return static_cast<unsigned>((n + per_block - 1) / per_block);
}

// Exclusive prefix sum over a block of kThreads threads: returns the sum of `v` over the
// lower threads and sets `total` to the block's sum. Uses 32 int64 of shared scratch.
template <int kThreads>
__device__ __forceinline__ int64_t block_exclusive_scan(int64_t v, int64_t* warp_sums,
                                                        int64_t& total) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t inclusive = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t up = __shfl_up_sync(kFullMask, inclusive, o);
    if (lane >= o) inclusive += up;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int64_t s = lane < kThreads / 32 ? warp_sums[lane] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t up = __shfl_up_sync(kFullMask, s, o);
      if (lane >= o) s += up;
    }
    warp_sums[lane] = s;  // inclusive over warps
  }
  __syncthreads();
  total = warp_sums[kThreads / 32 - 1];
  const int64_t before = (warp > 0 ? warp_sums[warp - 1] : 0) + inclusive - v;
  __syncthreads();  // warp_sums may be reused by the caller's next round
  return before;
}

// Threads of the one-block scans (block_offsets).
constexpr int kScanThreads = 1024;

// offsets[i] = sum of values[0:i] for i <= n, one block; values(i) is a functor.
template <typename Values, typename Out>
__device__ __forceinline__ void block_offsets(Values values, int64_t n, Out* out) {
  __shared__ int64_t warp_sums[32];
  int64_t carry = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kScanThreads) {
    const int64_t i = i0 + threadIdx.x;
    const int64_t v = i < n ? values(i) : 0;
    int64_t total;
    const int64_t before = block_exclusive_scan<kScanThreads>(v, warp_sums, total);
    if (i < n) out[i] = static_cast<Out>(carry + before);
    carry += total;
  }
  if (threadIdx.x == 0) out[n] = static_cast<Out>(carry);
}

}  // namespace cuda
}  // namespace moe_ext
