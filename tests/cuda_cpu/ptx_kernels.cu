// Kernels that exercise csrc/cuda/ptx.cuh (see ptx_kernels.h). One warp each.
#include "ptx_kernels.h"

#include "ptx.cuh"

namespace moe_ext {
namespace cuda {
namespace ptx_test {
namespace {

// Conversions by name: the extension builds with __CUDA_NO_HALF_CONVERSIONS__ (torch's
// flags, which the nvcc check uses too).
template <typename T>
__device__ T to_b16(float v) {
  if constexpr (std::is_same<T, __half>::value) return __float2half_rn(v);
  else return __float2bfloat16_rn(v);
}

template <typename T>
__device__ uint32_t pack(float lo, float hi) {
  return pack_b16x2(to_b16<T>(lo), to_b16<T>(hi));
}

// Fragments straight from the PTX ISA's formulas (groupID g = lane / 4, t = lane % 4).
template <typename T>
__global__ void mma_fragment_kernel(const float* A, const float* B, const float* C, float* D) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  uint32_t a[4], b[2];
  for (int r = 0; r < 4; ++r) {  // a_i, i = 2r + j: row g + 8 (i / 2 % 2), col 2t + j + 8 (i / 4)
    const int row = g + 8 * (r % 2), col = 2 * t + 8 * (r / 2);
    a[r] = pack<T>(A[row * 16 + col], A[row * 16 + col + 1]);
  }
  for (int r = 0; r < 2; ++r) {  // b_i: row 2t + j + 8 (i / 2), col g
    const int k = 2 * t + 8 * r;
    b[r] = pack<T>(B[k * 8 + g], B[(k + 1) * 8 + g]);
  }
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = C[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
  mma_m16n8k16<T>(acc, a, b, acc);
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = acc[i];
}

template <int kMatrices, bool kTrans>
__global__ void ldmatrix_kernel(const uint16_t* M, uint32_t* out) {
  __shared__ __align__(16) uint16_t tile[4 * 64];
  const int lane = threadIdx.x;
  for (int i = lane; i < kMatrices * 64; i += 32) tile[i] = M[i];
  __syncwarp();
  const uint16_t* row = &tile[(lane / 8 % kMatrices) * 64 + (lane % 8) * 8];
  uint32_t r[kMatrices];
  ldmatrix<kMatrices, kTrans>(r, row);
  for (int i = 0; i < kMatrices; ++i) out[lane * kMatrices + i] = r[i];
}

// 16 x 16 tiles of A (m, k) and of B ((k, n) or (n, k)) per stage: 32 chunks of 16 bytes
// each, one per lane.
template <typename T, bool kKMajor, bool kWait>
__global__ void tile_gemm_kernel(const T* A, const T* B, int K, float* C) {
  __shared__ __align__(16) T As[2][16][16];
  __shared__ __align__(16) T Bs[2][16][16];
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  const int row = lane / 2, half = (lane % 2) * 8;  // this lane's chunk: row, 8 elements
  auto issue = [&](int stage, int k0) {
    cp_async_16(&As[stage][row][half], A + row * K + k0 + half);
    if (kKMajor) cp_async_16(&Bs[stage][row][half], B + (k0 + row) * 16 + half);
    else cp_async_16(&Bs[stage][row][half], B + row * K + k0 + half);
    cp_async_commit();
  };
  float acc[2][4] = {};
  const int steps = K / 16;
  issue(0, 0);
  for (int s = 0; s < steps; ++s) {
    const int stage = s % 2;
    if (s + 1 < steps) issue((s + 1) % 2, (s + 1) * 16);
    if (kWait) {
      if (s + 1 < steps) cp_async_wait<1>();
      else cp_async_wait<0>();
    }
    __syncwarp();  // every lane's copies are in shared memory
    uint32_t a[4];
    ldmatrix<4>(a, &As[stage][(lane % 8) + 8 * (lane / 8 % 2)][8 * (lane / 16)]);
    for (int j = 0; j < 2; ++j) {
      uint32_t b[2];
      if (kKMajor) ldmatrix<2, true>(b, &Bs[stage][(lane % 8) + 8 * (lane / 8 % 2)][8 * j]);
      else ldmatrix<2>(b, &Bs[stage][8 * j + lane % 8][8 * (lane / 8 % 2)]);
      mma_m16n8k16<T>(acc[j], a, b, acc[j]);
    }
    __syncwarp();  // the stage is read before the next copies overwrite it
  }
  for (int j = 0; j < 2; ++j)
    for (int i = 0; i < 4; ++i) C[(g + 8 * (i / 2)) * 16 + 8 * j + 2 * t + i % 2] = acc[j][i];
}

__global__ void zero_fill_kernel(const unsigned char* src, int src_bytes, unsigned char* dst) {
  __shared__ __align__(16) unsigned char buf[16];
  if (threadIdx.x == 0) {
    cp_async_16(buf, src, src_bytes);
    cp_async_wait_all();
    for (int i = 0; i < 16; ++i) dst[i] = buf[i];
  }
}

__global__ void misuse_kernel(int which, unsigned char* scratch) {
  __shared__ __align__(16) uint16_t tile[8 * 8 + 8];
  const int lane = threadIdx.x;
  for (int i = lane; i < 72; i += 32) tile[i] = 0;
  __syncwarp();
  if (which == 0) {
    uint32_t r[1];
    ldmatrix<1>(r, &tile[1 + (lane % 8) * 8]);  // 2 bytes off: not 16-byte aligned
  } else if (which == 1) {
    if (lane == 0) cp_async_16(scratch + 16, scratch);  // destination in global memory
  } else {
    if (lane == 3) return;
    uint32_t a[4] = {}, b[2] = {};
    float acc[4] = {};
    mma_m16n8k16<__half>(acc, a, b, acc);
  }
}

}  // namespace

cudaError_t mma_from_fragments(bool bf16, const float* A, const float* B, const float* C, float* D) {
  if (bf16) launch_kernel<mma_fragment_kernel<__nv_bfloat16>>(1, 32, 0, nullptr, A, B, C, D);
  else launch_kernel<mma_fragment_kernel<__half>>(1, 32, 0, nullptr, A, B, C, D);
  return cudaGetLastError();
}

cudaError_t ldmatrix_registers(int matrices, bool trans, const uint16_t* M, uint32_t* out) {
  if (matrices == 1 && !trans) launch_kernel<ldmatrix_kernel<1, false>>(1, 32, 0, nullptr, M, out);
  if (matrices == 2 && !trans) launch_kernel<ldmatrix_kernel<2, false>>(1, 32, 0, nullptr, M, out);
  if (matrices == 4 && !trans) launch_kernel<ldmatrix_kernel<4, false>>(1, 32, 0, nullptr, M, out);
  if (matrices == 1 && trans) launch_kernel<ldmatrix_kernel<1, true>>(1, 32, 0, nullptr, M, out);
  if (matrices == 2 && trans) launch_kernel<ldmatrix_kernel<2, true>>(1, 32, 0, nullptr, M, out);
  if (matrices == 4 && trans) launch_kernel<ldmatrix_kernel<4, true>>(1, 32, 0, nullptr, M, out);
  return cudaGetLastError();
}

template <typename T>
void launch_tile_gemm(bool k_major, bool wait, int K, const void* A, const void* B, float* C) {
  const T* a = static_cast<const T*>(A);
  const T* b = static_cast<const T*>(B);
  if (k_major && wait) launch_kernel<tile_gemm_kernel<T, true, true>>(1, 32, 0, nullptr, a, b, K, C);
  if (k_major && !wait) launch_kernel<tile_gemm_kernel<T, true, false>>(1, 32, 0, nullptr, a, b, K, C);
  if (!k_major && wait) launch_kernel<tile_gemm_kernel<T, false, true>>(1, 32, 0, nullptr, a, b, K, C);
  if (!k_major && !wait) launch_kernel<tile_gemm_kernel<T, false, false>>(1, 32, 0, nullptr, a, b, K, C);
}

cudaError_t tile_gemm(bool bf16, bool k_major, bool wait, int K, const void* A, const void* B,
                      float* C) {
  if (bf16) launch_tile_gemm<__nv_bfloat16>(k_major, wait, K, A, B, C);
  else launch_tile_gemm<__half>(k_major, wait, K, A, B, C);
  return cudaGetLastError();
}

cudaError_t copy_zero_fill(const void* src, int src_bytes, void* dst16) {
  launch_kernel<zero_fill_kernel>(1, 32, 0, nullptr, static_cast<const unsigned char*>(src),
                                  src_bytes, static_cast<unsigned char*>(dst16));
  return cudaGetLastError();
}

cudaError_t misuse(int which, void* scratch) {
  launch_kernel<misuse_kernel>(1, 32, 0, nullptr, which, static_cast<unsigned char*>(scratch));
  return cudaGetLastError();
}

}  // namespace ptx_test
}  // namespace cuda
}  // namespace moe_ext
