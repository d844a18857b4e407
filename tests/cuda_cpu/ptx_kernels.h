// Test kernels of csrc/cuda/ptx.cuh (ptx_kernels.cu): built for the CPU execution model by
// `make test-cuda-cpu` (test_ptx.cpp checks them against a naive GEMM) and compiled with
// nvcc for sm_80 and sm_90a there too, so that their inline PTX assembles.
#pragma once
#include <cstdint>

#include "cuda_api.cuh"

namespace moe_ext {
namespace cuda {
namespace ptx_test {

// D (16 x 8) = A (16 x 16) B (16 x 8) + C, fragments built by each lane from the PTX ISA
// tables, one mma.sync (accumulating in place). Inputs are float, rounded to bf16 / fp16.
cudaError_t mma_from_fragments(bool bf16, const float* A, const float* B, const float* C, float* D);

// Each lane's registers after ldmatrix .x`matrices` (.trans) of `matrices` 8x8 b16
// matrices (row-major, one after the other): out[lane * matrices + i].
cudaError_t ldmatrix_registers(int matrices, bool trans, const uint16_t* M, uint32_t* out);

// C (16 x 16, fp32) = A (16 x K) B, K a multiple of 16: one warp, a 2-stage cp.async
// pipeline into shared memory, ldmatrix, mma. B is K x N row-major (k_major) or N x K.
// wait = false drops the cp.async waits (the bug the model must expose).
cudaError_t tile_gemm(bool bf16, bool k_major, bool wait, int K, const void* A, const void* B,
                      float* C);

// cp.async of 16 bytes with src_bytes valid ones (the rest zero-filled), then wait_all.
cudaError_t copy_zero_fill(const void* src, int src_bytes, void* dst16);

// Misuse that the model must report: 0 ldmatrix on a misaligned row, 1 cp.async into
// global memory, 2 mma.sync with a lane that has exited.
cudaError_t misuse(int which, void* scratch);

}  // namespace ptx_test
}  // namespace cuda
}  // namespace moe_ext
