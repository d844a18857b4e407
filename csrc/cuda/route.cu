// CUDA kernels for routing: fused (logits + bias) / tau -> softmax -> top-K -> renormalise
// -> counts, and its backward. One warp per token row; K selection rounds, each taking the
// best probability strictly after the previous pick in the order (p descending, id
// ascending), so ties go to the lower id exactly as on the CPU and no scratch is needed.
#include "common.cuh"

namespace moe_ext {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // warps per block

template <typename scalar_t>
__global__ void route_kernel(const scalar_t* __restrict__ logits, const acc_of<scalar_t>* bias,
                             int64_t T, int M, int K, acc_of<scalar_t> inv_tau, bool normalize,
                             acc_of<scalar_t>* __restrict__ probs,
                             acc_of<scalar_t>* __restrict__ weights,
                             int64_t* __restrict__ experts, unsigned long long* counts) {
  using acc_t = acc_of<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (t >= T) return;  // whole warps leave together
  const scalar_t* row = logits + t * M;
  acc_t* p = probs + t * M;

  // Exponents ((u - u_max) / tau) * 2 with u = logits/2 + bias/2, as on the CPU: finite
  // logits, bias and temperature never overflow to inf - inf = NaN.
  acc_t zmax = -std::numeric_limits<acc_t>::infinity();
  for (int j = lane; j < M; j += 32) {
    acc_t z = to_acc(row[j]) * acc_t(0.5);
    if (bias) z += bias[j] * acc_t(0.5);
    p[j] = z;
    zmax = max(zmax, z);
  }
  zmax = warp_max(zmax);
  acc_t total = 0;
  for (int j = lane; j < M; j += 32) {
    const acc_t e = acc_exp(((p[j] - zmax) * inv_tau) * acc_t(2));
    p[j] = e;
    total += e;
  }
  const acc_t inv_total = acc_t(1) / warp_sum(total);
  for (int j = lane; j < M; j += 32) p[j] *= inv_total;
  __syncwarp();  // each lane reads all of p below

  acc_t prev_p = std::numeric_limits<acc_t>::infinity(), chosen = 0;
  int prev_j = -1;
  for (int k = 0; k < K; ++k) {
    acc_t best_p = -1;
    int best_j = M;
    for (int j = lane; j < M; j += 32) {
      const acc_t v = p[j];
      const bool after_prev = v < prev_p || (v == prev_p && j > prev_j);
      if (after_prev && (v > best_p || (v == best_p && j < best_j))) {
        best_p = v;
        best_j = j;
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const acc_t other_p = __shfl_xor_sync(kFullMask, best_p, o);
      const int other_j = __shfl_xor_sync(kFullMask, best_j, o);
      if (other_p > best_p || (other_p == best_p && other_j < best_j)) {
        best_p = other_p;
        best_j = other_j;
      }
    }
    if (best_j >= M) {  // only with NaN probabilities: stay in bounds, keep the NaN
      best_j = k % M;
      best_p = std::numeric_limits<acc_t>::quiet_NaN();
    }
    if (lane == 0) {
      experts[t * K + k] = best_j;
      weights[t * K + k] = best_p;
      atomicAdd(counts + best_j, 1ull);  // integer: the total is order independent
    }
    chosen += best_p;  // in k order, as on the CPU
    prev_p = best_p;
    prev_j = best_j;
  }
  if (normalize) {
    __syncwarp();
    const acc_t scale = acc_t(1) / chosen;
    for (int k = lane; k < K; k += 32) weights[t * K + k] *= scale;
  }
}

// g = grad_probs + what flows from the weights (w_k = p[e_k] / S), then the softmax
// backward: out = p * (g - <p, g>) / tau. Lane 0 adds the K sparse terms in k order.
template <typename acc_t>
__global__ void route_backward_kernel(const acc_t* grad_probs, const acc_t* __restrict__ grad_w,
                                      const acc_t* __restrict__ probs, const acc_t* __restrict__ w,
                                      const int64_t* __restrict__ experts, int64_t T, int M, int K,
                                      acc_t inv_tau, bool normalize, acc_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (t >= T) return;
  const acc_t* p = probs + t * M;
  acc_t* g = out + t * M;
  for (int j = lane; j < M; j += 32) g[j] = grad_probs ? grad_probs[t * M + j] : acc_t(0);
  __syncwarp();
  if (lane == 0) {
    const acc_t* gw = grad_w + t * K;
    const int64_t* e = experts + t * K;
    if (normalize) {
      acc_t S = 0, dot = 0;
      for (int k = 0; k < K; ++k) {
        if (is_lora(e[k], M)) S += p[e[k]];
        dot += gw[k] * w[t * K + k];
      }
      for (int k = 0; k < K; ++k)
        if (is_lora(e[k], M)) g[e[k]] += (gw[k] - dot) / S;
    } else {
      for (int k = 0; k < K; ++k)
        if (is_lora(e[k], M)) g[e[k]] += gw[k];
    }
  }
  __syncwarp();
  acc_t pg = 0;
  for (int j = lane; j < M; j += 32) pg += p[j] * g[j];
  pg = warp_sum(pg);
  for (int j = lane; j < M; j += 32) g[j] = p[j] * (g[j] - pg) * inv_tau;
}

}  // namespace

cudaError_t launch_route(DType dtype, const void* logits, const void* bias, int64_t T, int64_t M,
                         int64_t K, double inv_tau, bool normalize, void* probs, void* weights,
                         int64_t* experts, int64_t* counts, cudaStream_t stream) {
  if (T == 0) return cudaGetLastError();
  dispatch_all(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    launch_kernel<route_kernel<scalar_t>>(
        blocks_for(T, kRowsPerBlock), kRowsPerBlock * 32, 0, stream,
        static_cast<const scalar_t*>(logits), static_cast<const acc_t*>(bias), T,
        static_cast<int>(M), static_cast<int>(K), static_cast<acc_t>(inv_tau), normalize,
        static_cast<acc_t*>(probs), static_cast<acc_t*>(weights), experts,
        reinterpret_cast<unsigned long long*>(counts));
  });
  return cudaGetLastError();
}

cudaError_t launch_route_backward(DType dtype, const void* grad_probs, const void* grad_weights,
                                  const void* probs, const void* weights, const int64_t* experts,
                                  int64_t T, int64_t M, int64_t K, double inv_tau, bool normalize,
                                  void* out, cudaStream_t stream) {
  if (T == 0) return cudaGetLastError();
  dispatch_acc(dtype, [&](auto tag) {
    using acc_t = decltype(tag);
    launch_kernel<route_backward_kernel<acc_t>>(
        blocks_for(T, kRowsPerBlock), kRowsPerBlock * 32, 0, stream,
        static_cast<const acc_t*>(grad_probs), static_cast<const acc_t*>(grad_weights),
        static_cast<const acc_t*>(probs), static_cast<const acc_t*>(weights), experts, T,
        static_cast<int>(M), static_cast<int>(K), static_cast<acc_t>(inv_tau), normalize,
        static_cast<acc_t*>(out));
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace moe_ext
