// Tensor-core and async-copy building blocks (sm_80+), each a small device function: inline
// PTX with nvcc, a host model in the CPU execution model (cpu_model/ptx_model.h, which
// states the fragment layouts and the semantics it checks). Kernels use these instead of
// writing asm themselves, so that the model can run them.
//
//   mma_m16n8k16<T>(d, a, b, c)       D = A B + C, A 16x16 (row), B 16x8 (col), fp32 C/D,
//                                     T = __half or __nv_bfloat16; warp-wide; d may be c
//   ldmatrix<N, Trans>(r, row)        N = 1, 2, 4 8x8 b16 matrices from shared memory, lanes
//                                     8i..8i+7 giving the rows of matrix i; Trans transposes
//   cp_async_16(smem, gmem, n = 16)   16-byte global -> shared copy, zero-filled past n bytes
//   cp_async_commit()                 closes this thread's group of copies
//   cp_async_wait<N>()                waits until at most N groups are in flight
//   cp_async_wait_all()               commit + wait for all
//   pack_b16x2(lo, hi)                two 16-bit values in one register (lo in bits 0-15)
//
// A typical bf16 tile: A row-major in shared memory -> ldmatrix<4> gives the A fragment;
// B stored k-major (K x N, row-major) -> ldmatrix<2, true> gives the B fragment of an
// 8-column slice; B stored n-major (N x K) -> ldmatrix<2>. tests/cuda_cpu/ptx_kernels.cu
// has such a kernel (a cp.async pipeline with two stages).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_api.cuh"

#if defined(MOE_EXT_CPU_MODEL)
// The caller's source location, for the model's diagnostics (nothing with nvcc).
#define MOE_EXT_PTX_SITE , ::moe_ext::cpu_model::Site site = ::moe_ext::cpu_model::Site::here()
#else
#define MOE_EXT_PTX_SITE
#endif

namespace moe_ext {
namespace cuda {

template <typename T>
__device__ __forceinline__ uint32_t pack_b16x2(T lo, T hi) {
  static_assert(sizeof(T) == 2, "16-bit element type");
  uint16_t l, h;
  memcpy(&l, &lo, 2);
  memcpy(&h, &hi, 2);
  return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
}

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2],
                                             const float (&c)[4] MOE_EXT_PTX_SITE) {
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  static_assert(kBf16 || std::is_same<T, __half>::value, "mma_m16n8k16: __half or __nv_bfloat16");
#if defined(MOE_EXT_CPU_MODEL)
  ::moe_ext::cpu_model::mma_m16n8k16(kBf16, d, a, b, c, site);
#else
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
  }
#endif
}

#if !defined(MOE_EXT_CPU_MODEL)
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// kMatrices (1, 2, 4) 8x8 matrices of 16-bit elements; lanes 8i..8i+7 give the row
// addresses of matrix i (16 bytes each, 16-byte aligned, in shared memory); lane l gets in
// r[i] the elements (l / 4, 2 (l % 4) + j) of matrix i, or (2 (l % 4) + j, l / 4) with
// kTrans (j = 0 in the low 16 bits). Warp-wide.
template <int kMatrices, bool kTrans = false>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[kMatrices],
                                         const void* row MOE_EXT_PTX_SITE) {
  static_assert(kMatrices == 1 || kMatrices == 2 || kMatrices == 4, "ldmatrix .x1, .x2 or .x4");
#if defined(MOE_EXT_CPU_MODEL)
  ::moe_ext::cpu_model::ldmatrix<kMatrices>(r, row, kTrans, site);
#else
  const uint32_t a = shared_address(row);
  if constexpr (kMatrices == 1 && !kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(a) : "memory");
  else if constexpr (kMatrices == 1)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(a) : "memory");
  else if constexpr (kMatrices == 2 && !kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a) : "memory");
  else if constexpr (kMatrices == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a) : "memory");
  else if constexpr (!kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
#endif
}

// Both addresses 16-byte aligned; bytes past src_bytes (0..16) are zero-filled, so a
// tile's out-of-range rows can be copied with src_bytes = 0 instead of branching.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem,
                                            int src_bytes = 16 MOE_EXT_PTX_SITE) {
#if defined(MOE_EXT_CPU_MODEL)
  ::moe_ext::cpu_model::cp_async_16(smem, gmem, src_bytes, site);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(shared_address(smem)), "l"(gmem), "r"(src_bytes) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(MOE_EXT_CPU_MODEL)
  ::moe_ext::cpu_model::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N >= 0 && N <= 7, "cp.async.wait_group takes 0..7");
#if defined(MOE_EXT_CPU_MODEL)
  ::moe_ext::cpu_model::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(MOE_EXT_CPU_MODEL)
  ::moe_ext::cpu_model::cp_async_commit();
  ::moe_ext::cpu_model::cp_async_wait(0);
#else
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

}  // namespace cuda
}  // namespace moe_ext
