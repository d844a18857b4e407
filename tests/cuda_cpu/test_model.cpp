// Self-tests of the CPU execution model (csrc/cuda/cpu_model): barriers, warp intrinsics,
// atomics, shared memory, launch limits, 16-bit types, and that misuse is reported.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "harness.h"

namespace moe_ext {
namespace cuda {
namespace model_test {

// out[b * n + t] = value of thread (t + 1) % n of the block, through shared memory.
__global__ void rotate_kernel(int* out) {
  __shared__ int cell[256];
  const int n = blockDim.x, t = threadIdx.x;
  cell[t] = blockIdx.x * 1000 + t;
  __syncthreads();
  out[blockIdx.x * n + t] = cell[(t + 1) % n];
}

// Threads >= keep exit at once; the rest meet at two barriers.
__global__ void early_exit_kernel(int* out, int keep) {
  __shared__ int cell[256];
  if (threadIdx.x >= keep) return;
  cell[threadIdx.x] = threadIdx.x;
  __syncthreads();
  __syncthreads();
  out[threadIdx.x] = cell[keep - 1 - threadIdx.x];
}

__global__ void barrier_count_kernel(int* out) {
  const int even = threadIdx.x % 2 == 0;
  out[0] = __syncthreads_count(even);
  out[1] = __syncthreads_and(even);
  out[2] = __syncthreads_or(even);
  out[3] = __syncthreads_and(1);
}

// Per lane: shfl idx/up/down/xor (width 32 and 8), ballot, any, all, match, reduce.
__global__ void warp_kernel(int* out) {
  const int lane = threadIdx.x;
  int* o = out + lane * 16;
  o[0] = __shfl_sync(0xffffffffu, lane * 10, 7);
  o[1] = __shfl_up_sync(0xffffffffu, lane, 3);
  o[2] = __shfl_down_sync(0xffffffffu, lane, 5);
  o[3] = __shfl_xor_sync(0xffffffffu, lane, 6);
  o[4] = __shfl_sync(0xffffffffu, lane, 3, 8);
  o[5] = __shfl_xor_sync(0xffffffffu, lane, 12, 8);
  o[6] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  o[7] = __any_sync(0xffffffffu, lane == 17);
  o[8] = __all_sync(0xffffffffu, lane < 31);
  o[9] = static_cast<int>(__match_any_sync(0xffffffffu, lane % 4));
  int pred = -1;
  o[10] = static_cast<int>(__match_all_sync(0xffffffffu, 5, &pred));
  o[11] = pred;
  o[12] = __reduce_add_sync(0xffffffffu, lane);
  o[13] = __reduce_max_sync(0xffffffffu, lane * 3 % 32);
  // two halves meet with their own masks at the same time
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  o[14] = __shfl_sync(half, lane, (lane & 16) + 15);
  o[15] = static_cast<int>(__shfl_xor_sync(0xffffffffu, 2.5, 1) * 2);
}

__global__ void active_mask_kernel(unsigned* out) {
  if (threadIdx.x % 2) return;
  __syncwarp(0x55555555u);
  out[threadIdx.x] = __activemask();
}

__global__ void atomics_kernel(int* i, unsigned long long* u, float* f, double* d, int* mx) {
  atomicAdd(i, 1);
  atomicAdd(u, 2ull);
  atomicAdd(f, 0.5f);
  atomicAdd(d, 0.25);
  atomicMax(mx, static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x));
}

// Reads shared memory before any write: garbage (0xff bytes) in every block.
__global__ void poison_kernel(float* f, int* i) {
  __shared__ float sf[4];
  __shared__ int si[4];
  if (threadIdx.x == 0) {
    f[blockIdx.x] = sf[blockIdx.x % 4];
    i[blockIdx.x] = si[blockIdx.x % 4];
    for (int k = 0; k < 4; ++k) sf[k] = 1.0f, si[k] = 1;  // the next block must not see these
  }
}

__global__ void dynamic_kernel(float* out) {
  float* buf = dynamic_shared_memory<float>();
  out[threadIdx.x] = buf[threadIdx.x];  // poisoned
  buf[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[blockDim.x + threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

__global__ void plain_kernel(int* out) { out[threadIdx.x] = 1; }

// ---- misuse
__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 32) __syncthreads();
  else __syncthreads();
}
__global__ void deadlock_kernel() {
  if (threadIdx.x == 0) __syncwarp(0x3u);  // waits for lane 1
  else __syncthreads();                    // lane 1 waits here for lane 0
}
__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
}
__global__ void not_in_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(threadIdx.x == 0 ? 0x2u : 0xffffffffu, 1, 0);
}
__global__ void mixed_intrinsics_kernel(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
  else out[threadIdx.x] = static_cast<int>(__ballot_sync(0xffffffffu, 1));
}
__global__ void bad_width_kernel(int* out) { out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0, 6); }

// Block 0 waits for a flag that only block 1 sets: a hang on the model (blocks run in
// turn), caught by the watchdog.
__global__ void cross_block_wait_kernel(volatile int* flag) {
  if (blockIdx.x == 1) *flag = 1;
  while (blockIdx.x == 0 && *flag == 0) {
  }
}

}  // namespace model_test
}  // namespace cuda
}  // namespace moe_ext

namespace cuda_cpu {
namespace {

namespace k = moe_ext::cuda::model_test;
using moe_ext::cuda::launch_kernel;

CUDA_CPU_CASE("model/__syncthreads orders shared memory", "tsan", [] {
  std::vector<int> out(3 * 256, -7);
  launch_kernel<k::rotate_kernel>(3, 256, 0, nullptr, out.data());
  check_cuda(cudaGetLastError(), "rotate_kernel");
  for (int b = 0; b < 3; ++b)
    for (int t = 0; t < 256; ++t) check(out[b * 256 + t] == b * 1000 + (t + 1) % 256, "block ", b, " thread ", t);
});

CUDA_CPU_CASE("model/exited threads leave the barrier", "tsan", [] {
  std::vector<int> out(256, -7);
  launch_kernel<k::early_exit_kernel>(1, 256, 0, nullptr, out.data(), 100);
  check_cuda(cudaGetLastError(), "early_exit_kernel");
  for (int t = 0; t < 100; ++t) check(out[t] == 99 - t, "thread ", t);
  check(out[100] == -7, "exited thread wrote");
});

CUDA_CPU_CASE("model/__syncthreads_count, _and, _or", "", [] {
  std::vector<int> out(4, -7);
  launch_kernel<k::barrier_count_kernel>(1, 96, 0, nullptr, out.data());
  check_cuda(cudaGetLastError(), "barrier_count_kernel");
  expect_equal("count/and/or/and(1)", out, std::vector<int>{48, 0, 1, 1});
});

CUDA_CPU_CASE("model/warp intrinsics", "tsan", [] {
  std::vector<int> out(32 * 16, -7);
  launch_kernel<k::warp_kernel>(1, 32, 0, nullptr, out.data());
  check_cuda(cudaGetLastError(), "warp_kernel");
  unsigned ballot = 0;
  for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
  for (int l = 0; l < 32; ++l) {
    const int* o = &out[l * 16];
    unsigned peers = 0;
    for (int p = l % 4; p < 32; p += 4) peers |= 1u << p;
    const int seg8 = l & ~7;
    const int want[16] = {70, l >= 3 ? l - 3 : l, l + 5 < 32 ? l + 5 : l, l ^ 6, seg8 + 3,
                          ((l ^ 12) >= seg8 + 8) ? l : (l ^ 12), static_cast<int>(ballot), 1, 0,
                          static_cast<int>(peers), -1, 1, 496, 31, (l & 16) + 15, 5};
    for (int i = 0; i < 16; ++i) check(o[i] == want[i], "lane ", l, " result ", i, ": ", o[i], ", want ", want[i]);
  }
});

CUDA_CPU_CASE("model/__activemask is reported (its result depends on scheduling)", "", [] {
  std::vector<unsigned> out(32, 7);
  expect_fault("__activemask", [&] { launch_kernel<k::active_mask_kernel>(1, 32, 0, nullptr, out.data()); });
});

CUDA_CPU_CASE("model/atomics", "tsan", [] {
  int i = 0, mx = -1;
  unsigned long long u = 0;
  float f = 0;
  double d = 0;
  launch_kernel<k::atomics_kernel>(4, 64, 0, nullptr, &i, &u, &f, &d, &mx);
  check_cuda(cudaGetLastError(), "atomics_kernel");
  check(i == 256 && u == 512 && f == 128.0f && d == 64.0 && mx == 255, "atomics: ", i, " ", u, " ", f,
        " ", d, " ", mx);
});

CUDA_CPU_CASE("model/shared memory starts as garbage in every block", "", [] {
  std::vector<float> f(4, 0);
  std::vector<int> i(4, 0);
  launch_kernel<k::poison_kernel>(4, 32, 0, nullptr, f.data(), i.data());
  check_cuda(cudaGetLastError(), "poison_kernel");
  for (int b = 0; b < 4; ++b) check(std::isnan(f[b]) && i[b] == -1, "block ", b, ": ", f[b], " ", i[b]);
});

CUDA_CPU_CASE("model/dynamic shared memory", "", [] {
  std::vector<float> out(2 * 64, 0);
  launch_kernel<k::dynamic_kernel>(1, 64, 64 * sizeof(float), nullptr, out.data());
  check_cuda(cudaGetLastError(), "dynamic_kernel");
  for (int t = 0; t < 64; ++t) check(std::isnan(out[t]) && out[64 + t] == 63 - t, "thread ", t);
  // above 48 KiB only after cudaFuncSetAttribute, and never above the device limit
  launch_kernel<k::dynamic_kernel>(1, 64, 64 * 1024, nullptr, out.data());
  check(cudaGetLastError() == cudaErrorInvalidValue, "64 KiB without the attribute must fail");
  check_cuda(cudaFuncSetAttribute(k::dynamic_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024),
             "cudaFuncSetAttribute");
  launch_kernel<k::dynamic_kernel>(1, 64, 64 * 1024, nullptr, out.data());
  check_cuda(cudaGetLastError(), "64 KiB with the attribute");
  check(cudaFuncSetAttribute(k::dynamic_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024) ==
            cudaErrorInvalidValue,
        "200 KiB is over the sm_80 limit");
  cudaGetLastError();
});

CUDA_CPU_CASE("model/launches a GPU would refuse fail", "", [] {
  std::vector<int> out(2048, 0);
  const struct {
    dim3 grid, block;
    const char* what;
  } bad[] = {{dim3(1, 65536), dim3(32), "grid.y 65536"},
             {dim3(1, 1, 65536), dim3(32), "grid.z 65536"},
             {dim3(0), dim3(32), "empty grid"},
             {dim3(1), dim3(1025), "1025 threads"},
             {dim3(1), dim3(32, 32, 2), "2048 threads"},
             {dim3(1), dim3(1, 1, 65), "block.z 65"},
             {dim3(1), dim3(0), "empty block"}};
  for (const auto& b : bad) {
    launch_kernel<k::plain_kernel>(b.grid, b.block, 0, nullptr, out.data());
    check(cudaGetLastError() == cudaErrorInvalidConfiguration, b.what, " must fail to launch");
    check(cudaGetLastError() == cudaSuccess, "a configuration error is not sticky");
  }
  check(out[0] == 0, "a refused launch ran");
});

CUDA_CPU_CASE("model/divergent __syncthreads is reported", "", [] {
  expect_fault("at __syncthreads at test_model.cpp",
               [] { launch_kernel<k::divergent_barrier_kernel>(1, 64, 0, nullptr); });
});

CUDA_CPU_CASE("model/deadlock is reported, not hung", "", [] {
  expect_fault("deadlock", [] { launch_kernel<k::deadlock_kernel>(1, 32, 0, nullptr); });
});

CUDA_CPU_CASE("model/a mask naming an exited lane is reported", "", [] {
  std::vector<int> out(32);
  expect_fault("exited",
               [&] { launch_kernel<k::exited_lane_kernel>(1, 32, 0, nullptr, out.data()); });
});

CUDA_CPU_CASE("model/a mask without the executing lane is reported", "", [] {
  std::vector<int> out(32);
  expect_fault("leaves out the executing lane 0",
               [&] { launch_kernel<k::not_in_mask_kernel>(1, 32, 0, nullptr, out.data()); });
});

CUDA_CPU_CASE("model/lanes at different intrinsics with one mask are reported", "", [] {
  std::vector<int> out(32);
  expect_fault("different warp intrinsics",
               [&] { launch_kernel<k::mixed_intrinsics_kernel>(1, 32, 0, nullptr, out.data()); });
});

CUDA_CPU_CASE("model/a bad shuffle width is reported", "", [] {
  std::vector<int> out(32);
  expect_fault("width 6", [&] { launch_kernel<k::bad_width_kernel>(1, 32, 0, nullptr, out.data()); });
});

CUDA_CPU_CASE("model/a fault is sticky until reset", "", [] {
  std::vector<int> out(32, 0);
  moe_ext::cpu_model::errors().quiet = true;
  launch_kernel<k::exited_lane_kernel>(1, 32, 0, nullptr, out.data());
  moe_ext::cpu_model::errors().quiet = false;
  check(cudaGetLastError() == cudaErrorLaunchFailure, "fault");
  launch_kernel<k::plain_kernel>(1, 32, 0, nullptr, out.data());
  check(cudaGetLastError() == cudaErrorLaunchFailure && out[0] == 0, "a faulted context runs nothing");
  moe_ext::cpu_model::reset_device();
  launch_kernel<k::plain_kernel>(1, 32, 0, nullptr, out.data());
  check_cuda(cudaGetLastError(), "after reset");
  check(out[0] == 1, "ran after reset");
});

CUDA_CPU_CASE("model/watchdog (must fail)", "manual", [] {
  static int flag = 0;
  launch_kernel<k::cross_block_wait_kernel>(2, 32, 0, nullptr, &flag);
});

// __half / __nv_bfloat16: every 16-bit pattern round-trips; float -> 16 bit rounds to
// the nearest representable value, ties to even (checked against both neighbours).
template <typename H>
void check_16bit(const char* name) {
  std::vector<double> values;
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    H h;
    std::memcpy(&h, &bits, 2);
    const float f = static_cast<float>(h);
    if (std::isnan(f)) continue;
    const H back(f);
    check(std::memcmp(&back, &h, 2) == 0, name, " pattern ", bits, " does not round-trip");
    values.push_back(f);
  }
  std::sort(values.begin(), values.end());
  std::mt19937 gen(1);
  std::uniform_real_distribution<double> pick(0, 1);
  for (int i = 0; i < 20000; ++i) {
    const size_t j = static_cast<size_t>(pick(gen) * (values.size() - 1));
    const double lo = values[j], hi = values[j + 1];
    const float x = static_cast<float>(lo + (hi - lo) * (i % 3 == 0 ? 0.5 : pick(gen)));
    const double got = static_cast<float>(H(x));
    const double best = std::fabs(x - lo) <= std::fabs(hi - x) ? lo : hi;
    if (std::fabs(x - lo) == std::fabs(hi - x)) {  // a tie: the even one (last bit 0)
      H hl(static_cast<float>(lo));
      uint16_t bits;
      std::memcpy(&bits, &hl, 2);
      check(got == ((bits & 1) ? hi : lo) || lo == 0 || hi == 0, name, " tie at ", x);
    } else {
      check(got == best, name, " rounds ", x, " to ", got, ", want ", best);
    }
  }
  check(std::isinf(static_cast<float>(H(3.4e38f))) && std::isnan(static_cast<float>(H(NAN))), name,
        " overflow / NaN");
}

CUDA_CPU_CASE("model/__half and __nv_bfloat16 conversions", "", [] {
  check_16bit<__half>("__half");
  check_16bit<__nv_bfloat16>("__nv_bfloat16");
});

}  // namespace
}  // namespace cuda_cpu
