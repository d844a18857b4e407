// The CPU execution model's mma.sync, ldmatrix and cp.async (csrc/cuda/ptx.cuh) against a
// naive GEMM and the PTX ISA's layouts, and the misuse it must report.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "harness.h"
#include "ptx_kernels.h"

namespace cuda_cpu {
namespace {

namespace p = moe_ext::cuda::ptx_test;

// Values exact in fp16 and bf16 (small multiples of 1/8), so products and sums are exact
// in double and the model's result must match the naive GEMM to float rounding.
std::vector<float> grid_values(size_t n, uint64_t seed) {
  std::vector<float> v(n);
  std::mt19937_64 gen(seed);
  for (auto& x : v) x = static_cast<float>(static_cast<int>(gen() % 33) - 16) / 8.0f;
  return v;
}

std::vector<double> naive_gemm(const std::vector<float>& A, const std::vector<float>& B, int M, int N,
                               int K, bool b_k_major) {
  std::vector<double> C(M * N, 0.0);
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n)
      for (int k = 0; k < K; ++k)
        C[m * N + n] += double(A[m * K + k]) * double(b_k_major ? B[k * N + n] : B[n * K + k]);
  return C;
}

CUDA_CPU_CASE("ptx/mma m16n8k16 = naive GEMM (fragments from the PTX tables)", "tsan", [] {
  for (bool bf16 : {true, false}) {
    const auto A = grid_values(16 * 16, 1), B = grid_values(16 * 8, 2), C = grid_values(16 * 8, 3);
    std::vector<float> D(16 * 8, 0);
    check_cuda(p::mma_from_fragments(bf16, A.data(), B.data(), C.data(), D.data()), "mma");
    auto want = naive_gemm(A, B, 16, 8, 16, true);
    for (int i = 0; i < 16 * 8; ++i) want[i] += C[i];
    expect_close(bf16 ? "D bf16" : "D fp16", std::vector<double>(D.begin(), D.end()), want, 1e-7);
  }
});

CUDA_CPU_CASE("ptx/ldmatrix x1 x2 x4 and .trans registers", "", [] {
  std::vector<uint16_t> M(4 * 64);
  for (int i = 0; i < 4 * 64; ++i) M[i] = static_cast<uint16_t>(i);  // matrix i / 64, (row, col)
  for (int n : {1, 2, 4})
    for (bool trans : {false, true}) {
      std::vector<uint32_t> out(32 * n, 0);
      check_cuda(p::ldmatrix_registers(n, trans, M.data(), out.data()), "ldmatrix");
      for (int lane = 0; lane < 32; ++lane)
        for (int m = 0; m < n; ++m)
          for (int j = 0; j < 2; ++j) {
            const int row = trans ? 2 * (lane % 4) + j : lane / 4;
            const int col = trans ? lane / 4 : 2 * (lane % 4) + j;
            const uint16_t got = static_cast<uint16_t>(out[lane * n + m] >> (16 * j));
            check(got == m * 64 + row * 8 + col, "x", n, trans ? ".trans" : "", " lane ", lane,
                  " matrix ", m, " half ", j, ": ", got, ", want ", m * 64 + row * 8 + col);
          }
    }
});

template <typename H>
std::vector<H> to16(const std::vector<float>& v) {
  std::vector<H> h(v.size());
  for (size_t i = 0; i < v.size(); ++i) h[i] = H(v[i]);
  return h;
}

void tile_gemm(bool bf16, bool k_major, bool wait, int K, std::vector<float>& C, std::vector<double>& want) {
  const auto A = grid_values(16 * K, 4), B = grid_values(K * 16, 5);
  C.assign(16 * 16, 0);
  if (bf16) {
    const auto a = to16<__nv_bfloat16>(A), b = to16<__nv_bfloat16>(B);
    check_cuda(p::tile_gemm(true, k_major, wait, K, a.data(), b.data(), C.data()), "tile_gemm");
  } else {
    const auto a = to16<__half>(A), b = to16<__half>(B);
    check_cuda(p::tile_gemm(false, k_major, wait, K, a.data(), b.data(), C.data()), "tile_gemm");
  }
  want = naive_gemm(A, B, 16, 16, K, k_major);
}

CUDA_CPU_CASE("ptx/cp.async + ldmatrix + mma tile GEMM = naive GEMM", "tsan", [] {
  for (bool bf16 : {true, false})
    for (bool k_major : {true, false}) {
      std::vector<float> C;
      std::vector<double> want;
      tile_gemm(bf16, k_major, true, 48, C, want);
      expect_close(std::string("C ") + (bf16 ? "bf16" : "fp16") + (k_major ? " B k-major" : " B n-major"),
                   std::vector<double>(C.begin(), C.end()), want, 1e-7);
    }
});

CUDA_CPU_CASE("ptx/a missing cp.async wait gives wrong results", "", [] {
  std::vector<float> C;
  std::vector<double> want;
  tile_gemm(true, true, false, 48, C, want);
  int wrong = 0;
  for (int i = 0; i < 256; ++i) wrong += !(std::fabs(C[i] - want[i]) <= 1e-6 * (1 + std::fabs(want[i])));
  check(wrong > 0, "every element right without the waits: the model does not delay cp.async");
});

CUDA_CPU_CASE("ptx/cp.async zero-fills past src_bytes", "", [] {
  unsigned char src[16] __attribute__((aligned(16))), dst[16];
  for (int i = 0; i < 16; ++i) src[i] = static_cast<unsigned char>(100 + i);
  check_cuda(p::copy_zero_fill(src, 6, dst), "copy_zero_fill");
  for (int i = 0; i < 16; ++i) check(dst[i] == (i < 6 ? 100 + i : 0), "byte ", i, ": ", int(dst[i]));
});

CUDA_CPU_CASE("ptx/misuse is reported", "", [] {
  alignas(16) unsigned char scratch[64] = {};
  expect_fault("not 16-byte aligned", [&] { p::misuse(0, scratch); });
  expect_fault("destination outside shared memory", [&] { p::misuse(1, scratch); });
  expect_fault("exited", [&] { p::misuse(2, scratch); });
});

}  // namespace
}  // namespace cuda_cpu
