// CUDA kernels for the dense-gated strategy's mask. The strategy's two GEMMs
// (x A_all^T and gated B_all) are cuBLAS calls made by functional.py; these kernels scale
// each token's chosen experts' R columns of h_all by s * w and zero the rest, and give the
// gradients of that mask. One thread per element (or per pair), fixed summation order.
#include "common.cuh"

namespace moe_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// s * (sum of the weights of the slots of token t that chose expert e), in k order.
template <typename acc_t>
__device__ __forceinline__ acc_t gate_of(const acc_t* w, const int64_t* experts, int64_t t,
                                         int64_t e, int64_t K, acc_t scaling) {
  acc_t g = 0;
  for (int64_t k = 0; k < K; ++k)
    if (experts[t * K + k] == e) g += w[t * K + k];
  return scaling * g;
}

// out = gate(t, e) * in, element-wise over (T, E*R): the mask in forward (in = h_all,
// out = gated) and its gradient to h_all in backward (in = grad_gated, out = grad_h_all).
template <typename scalar_t>
__global__ void gate_scale_kernel(const scalar_t* __restrict__ in,
                                  const acc_of<scalar_t>* __restrict__ w,
                                  const int64_t* __restrict__ experts, int64_t T, int64_t E,
                                  int64_t R, int64_t K, acc_of<scalar_t> scaling,
                                  scalar_t* __restrict__ out) {
  const int64_t width = E * R;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < T * width;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / width, e = (idx % width) / R;
    out[idx] = from_acc<scalar_t>(gate_of(w, experts, t, e, K, scaling) * to_acc(in[idx]));
  }
}

// grad_w[t, k] = s * <grad_gated[t, e*R : (e+1)*R], h_all[t, e*R : (e+1)*R]> (0 for null).
template <typename scalar_t>
__global__ void gate_dense_grad_w_kernel(const scalar_t* __restrict__ grad_gated,
                                         const scalar_t* __restrict__ h_all,
                                         const int64_t* __restrict__ experts, int64_t T, int64_t E,
                                         int64_t R, int64_t K, acc_of<scalar_t> scaling,
                                         acc_of<scalar_t>* __restrict__ grad_w) {
  using acc_t = acc_of<scalar_t>;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= T * K) return;
  const int64_t e = experts[p];
  if (!is_lora(e, E)) {
    grad_w[p] = 0;
    return;
  }
  const int64_t base = (p / K) * E * R + e * R;
  acc_t dot = 0;
  for (int64_t r = 0; r < R; ++r) dot += to_acc(grad_gated[base + r]) * to_acc(h_all[base + r]);
  grad_w[p] = scaling * dot;
}

unsigned grid_stride_blocks(int64_t n) {
  return static_cast<unsigned>(min64(blocks_for(n, kThreads), 65536));
}

}  // namespace

cudaError_t launch_gate_dense(DType dtype, const void* h_all, const void* w,
                              const int64_t* experts, int64_t T, int64_t E, int64_t R, int64_t K,
                              double scaling, void* gated, cudaStream_t stream) {
  if (T * E * R == 0) return cudaGetLastError();
  dispatch_all(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    launch_kernel<gate_scale_kernel<scalar_t>>(
        grid_stride_blocks(T * E * R), kThreads, 0, stream, static_cast<const scalar_t*>(h_all),
        static_cast<const acc_t*>(w), experts, T, E, R, K, static_cast<acc_t>(scaling),
        static_cast<scalar_t*>(gated));
  });
  return cudaGetLastError();
}

cudaError_t launch_gate_dense_backward(DType dtype, const void* grad_gated, const void* h_all,
                                       const void* w, const int64_t* experts, int64_t T,
                                       int64_t E, int64_t R, int64_t K, double scaling,
                                       void* grad_h_all, void* grad_w, cudaStream_t stream) {
  dispatch_all(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    const auto* g = static_cast<const scalar_t*>(grad_gated);
    const auto* h = static_cast<const scalar_t*>(h_all);
    const acc_t s = static_cast<acc_t>(scaling);
    if (T * E * R > 0)  // an empty grid is a launch error
      launch_kernel<gate_scale_kernel<scalar_t>>(
          grid_stride_blocks(T * E * R), kThreads, 0, stream, g, static_cast<const acc_t*>(w),
          experts, T, E, R, K, s, static_cast<scalar_t*>(grad_h_all));
    if (T * K > 0)
      launch_kernel<gate_dense_grad_w_kernel<scalar_t>>(
          blocks_for(T * K, kThreads), kThreads, 0, stream, g, h, experts, T, E, R, K, s,
          static_cast<acc_t*>(grad_w));
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace moe_ext
