// CUDA kernels of the sparse grouped LoRA strategy. The pairs are sorted by expert
// (align), cut into tiles of kPairTile pairs of one expert (tile_map), and each block
// works on one tile with the expert's weights staged in shared memory:
//   grouped_shrink:  h[p]  = W_e vecs[token(p)]           (forward A x, backward B^T dy)
//   grouped_expand:  o[p]  = scale_p W_e coef[p]          (forward s w B h, backward A^T dh)
//   combine_pairs:   y[t]  = sum_k o[t*K + k]             (the K-combine, in k order;
//                    the host runs expand + combine over column slabs to bound o's size)
//   weight_grad:     G_e   = sum_p coef[p] rows[token(p)]^T, one block per (expert,
//                    column block), pairs in sorted order
// Every output element is written by exactly one thread and summed in a fixed order: no
// atomics, bitwise repeatable. The grid sizes are host-side upper bounds (tiles past the
// device-side count exit at once), so nothing waits for the host. fp32 accumulation on
// CUDA cores (SIMT); tensor-core tiles are future work (see csrc/cuda/README.md).
#include "common.cuh"

namespace moe_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRankChunk = 16;  // LoRA rank rows handled per pass (R > 16 loops)
constexpr int kDepth = 32;      // reduction columns per shared-memory stage (shrink)
constexpr int kColumns = 128;   // output columns per block (expand, weight_grad)
constexpr int kGradPairs = 32;  // pairs per shared-memory stage (weight_grad)

// The tile `tile` -> its expert e (largest e with tile_start[e] <= tile), its first
// position in `order` and its number of pairs. False for tiles past the last one.
__device__ __forceinline__ bool locate_tile(const int32_t* tile_start, const int64_t* offsets,
                                            int64_t E, int64_t tile, int64_t& e, int64_t& first,
                                            int& m) {
  if (tile >= tile_start[E]) return false;
  int64_t lo = 0, hi = E;  // tile_start[lo] <= tile < tile_start[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (tile_start[mid] <= tile) lo = mid; else hi = mid;
  }
  e = lo;
  first = offsets[e] + (tile - tile_start[e]) * kPairTile;
  m = static_cast<int>(min64(kPairTile, offsets[e + 1] - first));
  return true;
}

// tile_start[e] = number of tiles of the experts before e (one block scan).
__global__ void tile_map_kernel(const int64_t* __restrict__ offsets, int64_t E,
                                int32_t* __restrict__ tile_start) {
  block_offsets(
      [offsets](int64_t e) { return (offsets[e + 1] - offsets[e] + kPairTile - 1) / kPairTile; },
      E, tile_start);
}

// Thread layout: 64 pairs x 16 rank rows; thread (pair tid / 4, rows 4 * (tid % 4) + j).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
grouped_shrink_kernel(const scalar_t* __restrict__ vecs, int64_t n, const scalar_t* __restrict__ W,
                      int64_t ws_e, int64_t ws_r, int64_t ws_c, const int64_t* __restrict__ order,
                      const int64_t* __restrict__ offsets, const int32_t* __restrict__ tile_start,
                      const int64_t* __restrict__ experts, int64_t E, int64_t K, int R,
                      acc_of<scalar_t>* __restrict__ out) {
  using acc_t = acc_of<scalar_t>;
  static_assert(kPairTile * kRankChunk == 4 * kThreads, "4 outputs per thread");
  __shared__ acc_t xs[kPairTile][kDepth + 1];
  __shared__ acc_t wsm[kRankChunk][kDepth + 1];
  __shared__ int64_t pair[kPairTile], row[kPairTile];  // row: the pair's token row offset
  int64_t e, first;
  int m;
  if (!locate_tile(tile_start, offsets, E, blockIdx.x, e, first, m)) return;
  if (threadIdx.x < kPairTile) {
    // A bad id counted into this expert's bin (align puts them in the last bin) is skipped.
    const int64_t p = threadIdx.x < m ? order[first + threadIdx.x] : -1;
    const bool mine = p >= 0 && experts[p] == e;
    pair[threadIdx.x] = mine ? p : -1;
    row[threadIdx.x] = mine ? (p / K) * n : -1;
  }
  __syncthreads();
  const scalar_t* We = W + e * ws_e;
  const int pi = threadIdx.x / 4, rq = threadIdx.x % 4;
  for (int r0 = 0; r0 < R; r0 += kRankChunk) {
    acc_t acc[4] = {0, 0, 0, 0};
    for (int64_t c0 = 0; c0 < n; c0 += kDepth) {
      for (int idx = threadIdx.x; idx < kPairTile * kDepth; idx += kThreads) {
        const int i = idx / kDepth, cc = idx % kDepth;
        xs[i][cc] = (row[i] >= 0 && c0 + cc < n) ? to_acc(vecs[row[i] + c0 + cc]) : acc_t(0);
      }
      for (int idx = threadIdx.x; idx < kRankChunk * kDepth; idx += kThreads) {
        const int rr = idx / kDepth, cc = idx % kDepth;
        wsm[rr][cc] = (r0 + rr < R && c0 + cc < n)
                          ? to_acc(We[(r0 + rr) * ws_r + (c0 + cc) * ws_c]) : acc_t(0);
      }
      __syncthreads();
#pragma unroll 8
      for (int cc = 0; cc < kDepth; ++cc) {
        const acc_t xv = xs[pi][cc];
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[j] += wsm[rq * 4 + j][cc] * xv;
      }
      __syncthreads();
    }
    if (pair[pi] >= 0) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = r0 + rq * 4 + j;
        if (r < R) out[pair[pi] * R + r] = acc[j];
      }
    }
  }
}

// Thread layout: 64 pairs x 128 columns; thread (pairs 4 * (tid / 16) + i, columns
// tid % 16 + 16 * j). Block (tile, column block).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
grouped_expand_kernel(const acc_of<scalar_t>* __restrict__ coef,
                      const acc_of<scalar_t>* __restrict__ pair_scale, acc_of<scalar_t> scaling,
                      const scalar_t* __restrict__ W, int64_t ws_e, int64_t ws_c, int64_t ws_r,
                      int64_t n, const int64_t* __restrict__ order,
                      const int64_t* __restrict__ offsets, const int32_t* __restrict__ tile_start,
                      int64_t E, int R, acc_of<scalar_t>* __restrict__ out) {
  using acc_t = acc_of<scalar_t>;
  __shared__ acc_t cs[kRankChunk][kPairTile + 1];  // +1: the transposing stores hit 16 banks
  __shared__ acc_t wsm[kRankChunk][kColumns];
  __shared__ int64_t pair[kPairTile];
  __shared__ acc_t scale[kPairTile];
  int64_t e, first;
  int m;
  if (!locate_tile(tile_start, offsets, E, blockIdx.x, e, first, m)) return;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kColumns;
  if (threadIdx.x < kPairTile) {
    const int64_t p = threadIdx.x < m ? order[first + threadIdx.x] : -1;
    pair[threadIdx.x] = p;
    scale[threadIdx.x] = p >= 0 && pair_scale ? scaling * pair_scale[p] : acc_t(1);
  }
  __syncthreads();
  const scalar_t* We = W + e * ws_e;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  acc_t acc[4][8] = {};
  for (int r0 = 0; r0 < R; r0 += kRankChunk) {
    for (int idx = threadIdx.x; idx < kPairTile * kRankChunk; idx += kThreads) {
      const int i = idx / kRankChunk, rr = idx % kRankChunk;
      cs[rr][i] = (i < m && r0 + rr < R) ? coef[pair[i] * R + r0 + rr] * scale[i] : acc_t(0);
    }
    for (int idx = threadIdx.x; idx < kRankChunk * kColumns; idx += kThreads) {
      const int rr = idx / kColumns, cc = idx % kColumns;
      wsm[rr][cc] = (r0 + rr < R && c0 + cc < n)
                        ? to_acc(We[(c0 + cc) * ws_c + (r0 + rr) * ws_r]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int rr = 0; rr < kRankChunk; ++rr) {
      acc_t a[4], b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = cs[rr][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = wsm[rr][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (ty * 4 + i >= m) continue;
    acc_t* row = out + pair[ty * 4 + i] * n;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t c = c0 + tx + 16 * j;
      if (c < n) row[c] = acc[i][j];
    }
  }
}

template <typename scalar_t>
__global__ void combine_pairs_kernel(const acc_of<scalar_t>* __restrict__ pair_out,
                                     const int64_t* __restrict__ experts, int64_t T, int64_t K,
                                     int64_t E, int64_t n, scalar_t* __restrict__ out,
                                     int64_t out_ld) {
  using acc_t = acc_of<scalar_t>;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < T * n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / n, c = idx % n;
    acc_t s = 0;
    for (int64_t k = 0; k < K; ++k)
      if (is_lora(experts[t * K + k], E)) s += pair_out[(t * K + k) * n + c];
    out[t * out_ld + c] = from_acc<scalar_t>(s);
  }
}

template <typename acc_t>
__global__ void pair_grads_kernel(const acc_t* __restrict__ gh, const acc_t* __restrict__ h,
                                  const acc_t* __restrict__ w, const int64_t* __restrict__ experts,
                                  int64_t P, int64_t E, int R, acc_t scaling,
                                  acc_t* __restrict__ dw, acc_t* __restrict__ dh) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= P) return;
  const bool lora = is_lora(experts[p], E);
  const acc_t gate = lora ? scaling * w[p] : acc_t(0);
  acc_t dot = 0;
  for (int r = 0; r < R; ++r) {
    const acc_t g = lora ? gh[p * R + r] : acc_t(0);  // gh rows of null pairs are never written
    dot += g * h[p * R + r];
    dh[p * R + r] = gate * g;
  }
  dw[p] = lora ? scaling * dot : acc_t(0);
}

// Block (expert e = blockIdx.x, column block blockIdx.y); thread (rank row tid / 16,
// columns tid % 16 + 16 * q). Pairs stream through shared memory kGradPairs at a time.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
weight_grad_kernel(const acc_of<scalar_t>* __restrict__ coef,
                   const acc_of<scalar_t>* __restrict__ pair_scale, acc_of<scalar_t> scaling,
                   const scalar_t* __restrict__ rows, int64_t n, const int64_t* __restrict__ order,
                   const int64_t* __restrict__ offsets, const int64_t* __restrict__ experts,
                   int64_t K, int R,
                   scalar_t* __restrict__ out, int64_t os_e, int64_t os_r, int64_t os_c) {
  using acc_t = acc_of<scalar_t>;
  static_assert(kRankChunk * 16 == kThreads && kColumns == 16 * 8, "layout");
  __shared__ acc_t rs[kGradPairs][kColumns];
  __shared__ acc_t sc[kGradPairs][kRankChunk + 1];
  __shared__ int64_t tok[kGradPairs];
  const int64_t e = blockIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kColumns;
  const int64_t begin = offsets[e], end = offsets[e + 1];
  const int ri = threadIdx.x / 16, cj = threadIdx.x % 16;
  for (int r0 = 0; r0 < R; r0 += kRankChunk) {
    acc_t acc[8] = {};
    for (int64_t i0 = begin; i0 < end; i0 += kGradPairs) {
      const int m = static_cast<int>(min64(kGradPairs, end - i0));
      if (threadIdx.x < kGradPairs) {
        const int i = threadIdx.x;
        const int64_t p = i < m ? order[i0 + i] : 0;
        tok[i] = p / K;
        const bool mine = i < m && experts[p] == e;  // bad ids in this bin add nothing
        const acc_t s = mine ? (pair_scale ? scaling * pair_scale[p] : acc_t(1)) : acc_t(0);
        for (int rr = 0; rr < kRankChunk; ++rr)
          sc[i][rr] = (mine && r0 + rr < R) ? s * coef[p * R + r0 + rr] : acc_t(0);
      }
      __syncthreads();
      for (int idx = threadIdx.x; idx < kGradPairs * kColumns; idx += kThreads) {
        const int i = idx / kColumns, cc = idx % kColumns;
        rs[i][cc] = (i < m && c0 + cc < n) ? to_acc(rows[tok[i] * n + c0 + cc]) : acc_t(0);
      }
      __syncthreads();
      for (int i = 0; i < m; ++i) {
        const acc_t a = sc[i][ri];
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[q] += a * rs[i][cj + 16 * q];
      }
      __syncthreads();
    }
    const int r = r0 + ri;
    if (r < R) {
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const int64_t c = c0 + cj + 16 * q;
        if (c < n) out[e * os_e + r * os_r + c * os_c] = from_acc<scalar_t>(acc[q]);
      }
    }
  }
}

}  // namespace

cudaError_t launch_tile_map(const int64_t* offsets, int64_t E, int32_t* tile_start,
                            cudaStream_t stream) {
  launch_kernel<tile_map_kernel>(1, kScanThreads, 0, stream, offsets, E, tile_start);
  return cudaGetLastError();
}

cudaError_t launch_grouped_shrink(DType dtype, const void* vecs, int64_t n, ExpertWeights W,
                                  const int64_t* order, const int64_t* offsets,
                                  const int32_t* tile_start, const int64_t* experts, int64_t P,
                                  int64_t E, int64_t K, int64_t R, void* out,
                                  cudaStream_t stream) {
  if (P == 0) return cudaGetLastError();
  dispatch_all(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    launch_kernel<grouped_shrink_kernel<scalar_t>>(max_pair_tiles(P, E), kThreads, 0, stream,
        static_cast<const scalar_t*>(vecs), n, static_cast<const scalar_t*>(W.data), W.stride_e,
        W.stride_i, W.stride_j, order, offsets, tile_start, experts, E, K, static_cast<int>(R),
        static_cast<acc_of<scalar_t>*>(out));
  });
  return cudaGetLastError();
}

cudaError_t launch_grouped_expand(DType dtype, const void* coef, const void* pair_scale,
                                  double scaling, ExpertWeights W, int64_t n,
                                  const int64_t* order, const int64_t* offsets,
                                  const int32_t* tile_start, int64_t P, int64_t E, int64_t K,
                                  int64_t R, void* out, cudaStream_t stream) {
  (void)K;  // the pair index already names the row
  if (P == 0 || n == 0) return cudaGetLastError();
  const dim3 grid(static_cast<unsigned>(max_pair_tiles(P, E)), blocks_for(n, kColumns));
  dispatch_all(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    launch_kernel<grouped_expand_kernel<scalar_t>>(grid, kThreads, 0, stream,
        static_cast<const acc_t*>(coef), static_cast<const acc_t*>(pair_scale),
        static_cast<acc_t>(scaling), static_cast<const scalar_t*>(W.data), W.stride_e, W.stride_i,
        W.stride_j, n, order, offsets, tile_start, E, static_cast<int>(R),
        static_cast<acc_t*>(out));
  });
  return cudaGetLastError();
}

cudaError_t launch_combine_pairs(DType dtype, const void* pair_out, const int64_t* experts,
                                 int64_t T, int64_t K, int64_t E, int64_t n, void* out,
                                 int64_t out_ld, cudaStream_t stream) {
  if (T * n == 0) return cudaGetLastError();
  const unsigned blocks = static_cast<unsigned>(min64(blocks_for(T * n, kThreads), 65536));
  dispatch_all(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    launch_kernel<combine_pairs_kernel<scalar_t>>(blocks, kThreads, 0, stream,
        static_cast<const acc_of<scalar_t>*>(pair_out), experts, T, K, E, n,
        static_cast<scalar_t*>(out), out_ld);
  });
  return cudaGetLastError();
}

cudaError_t launch_pair_grads(DType dtype, const void* gh, const void* h, const void* w,
                              const int64_t* experts, int64_t P, int64_t E, int64_t R,
                              double scaling, void* dw, void* dh, cudaStream_t stream) {
  if (P == 0) return cudaGetLastError();
  dispatch_acc(dtype, [&](auto tag) {
    using acc_t = decltype(tag);
    launch_kernel<pair_grads_kernel<acc_t>>(blocks_for(P, kThreads), kThreads, 0, stream,
        static_cast<const acc_t*>(gh), static_cast<const acc_t*>(h), static_cast<const acc_t*>(w),
        experts, P, E, static_cast<int>(R), static_cast<acc_t>(scaling), static_cast<acc_t*>(dw),
        static_cast<acc_t*>(dh));
  });
  return cudaGetLastError();
}

cudaError_t launch_weight_grad(DType dtype, const void* coef, const void* pair_scale,
                               double scaling, const void* rows, int64_t n, const int64_t* order,
                               const int64_t* offsets, const int64_t* experts, int64_t E,
                               int64_t K, int64_t R, void* out, int64_t out_stride_e,
                               int64_t out_stride_r, int64_t out_stride_c, cudaStream_t stream) {
  if (E == 0 || n == 0) return cudaGetLastError();
  const dim3 grid(static_cast<unsigned>(E), blocks_for(n, kColumns));
  dispatch_all(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    launch_kernel<weight_grad_kernel<scalar_t>>(grid, kThreads, 0, stream,
        static_cast<const acc_t*>(coef), static_cast<const acc_t*>(pair_scale),
        static_cast<acc_t>(scaling), static_cast<const scalar_t*>(rows), n, order, offsets,
        experts, K, static_cast<int>(R), static_cast<scalar_t*>(out), out_stride_e, out_stride_r,
        out_stride_c);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace moe_ext
