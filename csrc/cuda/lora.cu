// CUDA kernels of the sparse grouped LoRA strategy. The pairs are sorted by expert into
// E + 1 bins (align; bin E holds every null pair), cut into tiles of kPairTile pairs of one
// bin (tile_map), and each block works on one tile with the expert's weights staged in
// shared memory:
//   grouped_shrink:  h[p] = W_e vecs[token(p)]          (forward A x; backward gh = B^T dy,
//                    with dh[p] = s w[p] gh and dw[p] = s <gh, h[p]> in the epilogue)
//   grouped_expand:  one launch per slot k in k order: out[t] = scale_p W_e coef[p] for the
//                    pairs p = (t, k) of slot 0, out[t] += scale_p W_e coef[p] for those of
//                    slot k > 0 (forward s w B h, backward A^T dh); each launch writes
//                    every row at most once, so the K-combine needs no buffer and no race
//   weight_grad:     G_e = sum_p coef[p] rows[token(p)]^T, one block per (chunk of
//                    grad_chunk_pairs(P) pairs of e, column block); an expert with one
//                    chunk writes G_e, one with several leaves acc partials that
//                    weight_grad_reduce adds in chunk order (one hot expert spreads over
//                    many blocks).
// The tiles of bin E write zero rows, so every row of h, dh, dw and of out is written
// (no memset), and every sum runs in a fixed order: no atomics,
// bitwise repeatable. Grid sizes are host-side upper bounds (blocks past the device-side
// count exit at once), so nothing waits for the host. fp16/bf16 run the shrink and the
// expand and weight_grad on tensor cores (*_tc_kernel: mma.sync, ldmatrix, cp.async; fp32
// accumulation), fp32/fp64 on CUDA cores (SIMT, acc accumulation).
#include <tuple>

#include "common.cuh"
#include "ptx.cuh"

namespace moe_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRankChunk = 16;  // LoRA rank rows handled per pass (R > 16 loops)
constexpr int kDepth = 32;      // reduction columns per shared-memory stage (shrink)
constexpr int kColumns = 128;   // output columns per block (expand, weight_grad)
constexpr int kGradPairs = 32;  // pairs per shared-memory stage (weight_grad)

// The largest b < num_bins with starts[b] <= i, for i < starts[num_bins] (empty bins share
// their start with the next one, so the bin found is the one that holds i).
__device__ __forceinline__ int64_t find_bin(const int32_t* starts, int64_t num_bins, int64_t i) {
  int64_t lo = 0, hi = num_bins;  // starts[lo] <= i < starts[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (starts[mid] <= i) lo = mid; else hi = mid;
  }
  return lo;
}

// The tile `tile` -> its bin e (E for the null pairs), its first position in `order` and
// its number of pairs. False for tiles past the last one.
__device__ __forceinline__ bool locate_tile(const int32_t* tile_start, const int64_t* offsets,
                                            int64_t num_bins, int64_t tile, int64_t& e,
                                            int64_t& first, int& m) {
  if (tile >= tile_start[num_bins]) return false;
  e = find_bin(tile_start, num_bins, tile);
  first = offsets[e] + (tile - tile_start[e]) * kPairTile;
  m = static_cast<int>(min64(kPairTile, offsets[e + 1] - first));
  return true;
}

// tile_start[b] = number of tiles of the bins before b (one block scan).
__global__ void tile_map_kernel(const int64_t* __restrict__ offsets, int64_t num_bins,
                                int32_t* __restrict__ tile_start) {
  block_offsets(
      [offsets](int64_t b) { return (offsets[b + 1] - offsets[b] + kPairTile - 1) / kPairTile; },
      num_bins, tile_start);
}

// A shrink tile's pairs, by threads < kPairTile: pair[i] (-1 when not this bin's: bad ids
// or a wrong alignment, skipped), row[i] its token row offset in vecs (-1 for null tiles),
// and with `gate` (backward) s * w[p] (0 for null pairs).
template <typename acc_t>
__device__ __forceinline__ void stage_shrink_pairs(const int64_t* order, const int64_t* experts,
                                                   int64_t first, int m, int64_t e, int64_t E,
                                                   int64_t K, int64_t n, const acc_t* w,
                                                   acc_t scaling, int64_t* pair, int64_t* row,
                                                   acc_t* gate) {
  if (threadIdx.x >= kPairTile) return;
  const bool null_tile = e == E;
  const int64_t p = threadIdx.x < m ? order[first + threadIdx.x] : -1;
  const bool mine = p >= 0 && (null_tile ? !is_lora(experts[p], E) : experts[p] == e);
  pair[threadIdx.x] = mine ? p : -1;
  row[threadIdx.x] = mine && !null_tile ? (p / K) * n : -1;
  if (gate) gate[threadIdx.x] = mine && !null_tile ? scaling * w[p] : acc_t(0);
}

// An expand tile's pairs of slot `slot`, by threads < kPairTile: pair[i] (-1 for the
// tile's pairs of other slots and past its end) and its scale_p.
template <typename acc_t>
__device__ __forceinline__ void stage_expand_pairs(const int64_t* order, int64_t first, int m,
                                                   int64_t K, int64_t slot,
                                                   const acc_t* pair_scale, acc_t scaling,
                                                   int64_t* pair, acc_t* scale) {
  if (threadIdx.x >= kPairTile) return;
  int64_t p = threadIdx.x < m ? order[first + threadIdx.x] : -1;
  if (p % K != slot) p = -1;  // (-1 % K is -1, never a slot)
  pair[threadIdx.x] = p;
  scale[threadIdx.x] = p >= 0 && pair_scale ? scaling * pair_scale[p] : acc_t(1);
}

// The expand's store of one value of pair p = (t, slot)'s row: slot 0 writes out[t, c],
// later slots add to it (launches run in slot order: the sum is in k order).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void expand_store(scalar_t* out, int64_t p, int64_t K, int64_t slot,
                                             int64_t n, int64_t c, acc_t v) {
  scalar_t& o = out[(p / K) * n + c];
  o = from_acc<scalar_t>(slot == 0 ? v : to_acc(o) + v);
}

// The backward epilogue of the shrink (all acc): h (P, R) from the forward, w (P,), dw (P,).
template <typename acc_t>
struct ShrinkGrads {
  const acc_t* h;
  const acc_t* w;
  acc_t scaling;
  acc_t* dw;
};

// Thread layout: 64 pairs x 16 rank rows; thread (pair tid / 4, rows 4 * (tid % 4) + j), so
// a pair's 4 threads are adjacent lanes. kBackward: out = dh and the epilogue gives dw.
template <typename scalar_t, bool kBackward>
__global__ void __launch_bounds__(kThreads)
grouped_shrink_kernel(const scalar_t* __restrict__ vecs, int64_t n, const scalar_t* __restrict__ W,
                      int64_t ws_e, int64_t ws_r, int64_t ws_c, const int64_t* __restrict__ order,
                      const int64_t* __restrict__ offsets, const int32_t* __restrict__ tile_start,
                      const int64_t* __restrict__ experts, int64_t E, int64_t K, int R,
                      ShrinkGrads<acc_of<scalar_t>> grads, acc_of<scalar_t>* __restrict__ out) {
  using acc_t = acc_of<scalar_t>;
  static_assert(kPairTile * kRankChunk == 4 * kThreads, "4 outputs per thread");
  __shared__ acc_t xs[kPairTile][kDepth + 1];
  __shared__ acc_t wsm[kRankChunk][kDepth + 1];
  __shared__ int64_t pair[kPairTile], row[kPairTile];  // row: the pair's token row offset
  __shared__ acc_t gate[kPairTile];                    // backward: s * w[p]
  int64_t e, first;
  int m;
  if (!locate_tile(tile_start, offsets, E + 1, blockIdx.x, e, first, m)) return;
  const bool null_tile = e == E;  // block-uniform: its pairs get zero rows
  stage_shrink_pairs(order, experts, first, m, e, E, K, n, grads.w, grads.scaling, pair, row,
                     kBackward ? gate : nullptr);
  __syncthreads();
  const scalar_t* We = W + (null_tile ? 0 : e * ws_e);
  const int pi = threadIdx.x / 4, rq = threadIdx.x % 4;
  const int64_t p = pair[pi];
  acc_t dot = 0;  // backward: this thread's part of <gh[p], h[p]>
  for (int r0 = 0; r0 < R; r0 += kRankChunk) {
    acc_t acc[4] = {0, 0, 0, 0};
    for (int64_t c0 = 0; c0 < (null_tile ? 0 : n); c0 += kDepth) {
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
    if (p >= 0) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = r0 + rq * 4 + j;
        if (r >= R) continue;
        if (kBackward) {
          out[p * R + r] = gate[pi] * acc[j];
          if (!null_tile) dot += acc[j] * grads.h[p * R + r];
        } else {
          out[p * R + r] = acc[j];
        }
      }
    }
  }
  if (kBackward) {
    // The pair's 4 adjacent lanes add their parts; the butterfly gives all 4 the same bits.
    dot += __shfl_xor_sync(kFullMask, dot, 1);
    dot += __shfl_xor_sync(kFullMask, dot, 2);
    if (rq == 0 && p >= 0) grads.dw[p] = null_tile ? acc_t(0) : grads.scaling * dot;
  }
}

// The same shrink on tensor cores, for __half / __nv_bfloat16: 4 warps, warp w owns pairs
// 16w..16w+15 of the tile, the 16 rank rows of a chunk are two n8 tiles of
// mma_m16n8k16 (fp32 accumulation). The reduction runs in stages of kTcDepth columns,
// double-buffered: the gathered rows of vecs arrive by cp.async (16-byte chunks, when
// `aligned`: n % 8 == 0 and vecs 16-byte aligned) or by plain loads, the weights by
// plain loads (any strides), while the previous stage feeds ldmatrix + mma.
constexpr int kTcThreads = 128;
constexpr int kTcDepth = 64;
constexpr int kTcPad = kTcDepth + 8;  // row stride 144 bytes: ldmatrix rows hit distinct banks

template <typename scalar_t, bool kBackward>
__global__ void __launch_bounds__(kTcThreads)
grouped_shrink_tc_kernel(const scalar_t* __restrict__ vecs, int64_t n, bool aligned,
                         const scalar_t* __restrict__ W, int64_t ws_e, int64_t ws_r, int64_t ws_c,
                         const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                         const int32_t* __restrict__ tile_start,
                         const int64_t* __restrict__ experts, int64_t E, int64_t K, int R,
                         ShrinkGrads<float> grads, float* __restrict__ out) {
  static_assert(kPairTile == 16 * (kTcThreads / 32) && kRankChunk == 16, "warp tiles");
  __shared__ __align__(16) scalar_t xs[2][kPairTile][kTcPad];
  __shared__ __align__(16) scalar_t wsm[2][kRankChunk][kTcPad];
  __shared__ int64_t pair[kPairTile], row[kPairTile];
  __shared__ float gate[kPairTile];
  int64_t e, first;
  int m;
  if (!locate_tile(tile_start, offsets, E + 1, blockIdx.x, e, first, m)) return;
  const bool null_tile = e == E;
  stage_shrink_pairs(order, experts, first, m, e, E, K, n, grads.w, grads.scaling, pair, row,
                     kBackward ? gate : nullptr);
  __syncthreads();
  const scalar_t* We = W + (null_tile ? 0 : e * ws_e);
  const scalar_t zero = from_acc<scalar_t>(0.f);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int stages = null_tile ? 0 : static_cast<int>((n + kTcDepth - 1) / kTcDepth);
  // Rows g and g + 8 of the warp's 16 pairs (the accumulator fragment's rows).
  const int g = lane / 4;
  const int64_t p_lo = pair[warp * 16 + g], p_hi = pair[warp * 16 + g + 8];
  float dot[2] = {0.f, 0.f};
  for (int r0 = 0; r0 < R; r0 += kRankChunk) {
    auto issue = [&](int buf, int64_t c0) {
      if (aligned) {
        for (int idx = threadIdx.x; idx < kPairTile * (kTcDepth / 8); idx += kTcThreads) {
          const int i = idx / (kTcDepth / 8), cc = (idx % (kTcDepth / 8)) * 8;
          const bool ok = row[i] >= 0 && c0 + cc < n;
          cp_async_16(&xs[buf][i][cc], ok ? vecs + row[i] + c0 + cc : vecs, ok ? 16 : 0);
        }
      } else {
        for (int idx = threadIdx.x; idx < kPairTile * kTcDepth; idx += kTcThreads) {
          const int i = idx / kTcDepth, cc = idx % kTcDepth;
          xs[buf][i][cc] = (row[i] >= 0 && c0 + cc < n) ? vecs[row[i] + c0 + cc] : zero;
        }
      }
      cp_async_commit();
      for (int idx = threadIdx.x; idx < kRankChunk * kTcDepth; idx += kTcThreads) {
        const int rr = idx / kTcDepth, cc = idx % kTcDepth;
        wsm[buf][rr][cc] =
            (r0 + rr < R && c0 + cc < n) ? We[(r0 + rr) * ws_r + (c0 + cc) * ws_c] : zero;
      }
    };
    float acc[2][4] = {};
    if (stages > 0) issue(0, 0);
    for (int s = 0; s < stages; ++s) {
      const int buf = s % 2;
      if (s + 1 < stages) {
        issue((s + 1) % 2, static_cast<int64_t>(s + 1) * kTcDepth);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();  // every thread's copies and stores of stage s are in shared memory
#pragma unroll
      for (int kk = 0; kk < kTcDepth; kk += 16) {
        uint32_t a[4], b[4];
        ldmatrix<4>(a, &xs[buf][warp * 16 + lane % 16][kk + 8 * (lane / 16)]);
        ldmatrix<4>(b, &wsm[buf][8 * (lane / 16) + lane % 8][kk + 8 * (lane / 8 % 2)]);
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        mma_m16n8k16<scalar_t>(acc[0], a, b0, acc[0]);
        mma_m16n8k16<scalar_t>(acc[1], a, b1, acc[1]);
      }
      __syncthreads();  // stage s is consumed before stage s + 2 overwrites its buffer
    }
    // acc[j][i]: pair row g + 8 (i / 2), rank r0 + 8 j + 2 (lane % 4) + i % 2.
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t p = i < 2 ? p_lo : p_hi;
        const int r = r0 + 8 * j + 2 * (lane % 4) + i % 2;
        if (p < 0 || r >= R) continue;
        if (kBackward) {
          out[p * R + r] = gate[warp * 16 + g + 8 * (i / 2)] * acc[j][i];
          if (!null_tile) dot[i / 2] += acc[j][i] * grads.h[p * R + r];
        } else {
          out[p * R + r] = acc[j][i];
        }
      }
  }
  if (kBackward) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // the 4 lanes of a row add their parts
      dot[half] += __shfl_xor_sync(kFullMask, dot[half], 1);
      dot[half] += __shfl_xor_sync(kFullMask, dot[half], 2);
    }
    if (lane % 4 == 0) {
      if (p_lo >= 0) grads.dw[p_lo] = null_tile ? 0.f : grads.scaling * dot[0];
      if (p_hi >= 0) grads.dw[p_hi] = null_tile ? 0.f : grads.scaling * dot[1];
    }
  }
}

// Thread layout: 64 pairs x 128 columns; thread (pairs 4 * (tid / 16) + i, columns
// tid % 16 + 16 * j). Block (tile, column block). Only the tile's pairs of slot `slot`
// write (expand_store).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
grouped_expand_kernel(const acc_of<scalar_t>* __restrict__ coef,
                      const acc_of<scalar_t>* __restrict__ pair_scale, acc_of<scalar_t> scaling,
                      const scalar_t* __restrict__ W, int64_t ws_e, int64_t ws_c, int64_t ws_r,
                      int64_t n, const int64_t* __restrict__ order,
                      const int64_t* __restrict__ offsets, const int32_t* __restrict__ tile_start,
                      int64_t E, int64_t K, int64_t slot, int R, scalar_t* __restrict__ out) {
  using acc_t = acc_of<scalar_t>;
  __shared__ acc_t cs[kRankChunk][kPairTile + 1];  // +1: the transposing stores hit 16 banks
  __shared__ acc_t wsm[kRankChunk][kColumns];
  __shared__ int64_t pair[kPairTile];
  __shared__ acc_t scale[kPairTile];
  int64_t e, first;
  int m;
  if (!locate_tile(tile_start, offsets, E + 1, blockIdx.x, e, first, m)) return;
  const bool null_tile = e == E;  // block-uniform: zero rows
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kColumns;
  stage_expand_pairs(order, first, m, K, slot, pair_scale, scaling, pair, scale);
  __syncthreads();
  const scalar_t* We = W + (null_tile ? 0 : e * ws_e);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  acc_t acc[4][8] = {};
  for (int r0 = 0; r0 < (null_tile ? 0 : R); r0 += kRankChunk) {
    for (int idx = threadIdx.x; idx < kPairTile * kRankChunk; idx += kThreads) {
      const int i = idx / kRankChunk, rr = idx % kRankChunk;
      cs[rr][i] = (pair[i] >= 0 && r0 + rr < R) ? coef[pair[i] * R + r0 + rr] * scale[i] : acc_t(0);
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
    const int64_t p = pair[ty * 4 + i];
    if (p < 0) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t c = c0 + tx + 16 * j;
      if (c < n) expand_store(out, p, K, slot, n, c, acc[i][j]);
    }
  }
}

// The same expand on tensor cores, for __half / __nv_bfloat16: 4 warps, warp w owns pairs
// 16w..16w+15 of the tile and the block's 128 columns as 16 n8 tiles; each rank chunk of 16
// is one k16 step of mma_m16n8k16 (fp32 accumulation). The pair rows coef[p] are rounded
// to the data dtype for the mma (as a bf16 / fp16 GEMM would hold them); scale_p = s w_p
// multiplies the fp32 result in the epilogue (each mma row is one pair), so a large s w
// cannot overflow an fp16 intermediate.
template <typename scalar_t>
__global__ void __launch_bounds__(kTcThreads)
grouped_expand_tc_kernel(const float* __restrict__ coef, const float* __restrict__ pair_scale,
                         float scaling, const scalar_t* __restrict__ W, int64_t ws_e, int64_t ws_c,
                         int64_t ws_r, int64_t n, const int64_t* __restrict__ order,
                         const int64_t* __restrict__ offsets, const int32_t* __restrict__ tile_start,
                         int64_t E, int64_t K, int64_t slot, int R,
                         scalar_t* __restrict__ out) {
  constexpr int kPad = kRankChunk + 8;  // row stride 48 bytes: ldmatrix rows hit distinct banks
  __shared__ __align__(16) scalar_t cs[kPairTile][kPad];
  __shared__ __align__(16) scalar_t wsm[kColumns][kPad];
  __shared__ int64_t pair[kPairTile];
  __shared__ float scale[kPairTile];
  int64_t e, first;
  int m;
  if (!locate_tile(tile_start, offsets, E + 1, blockIdx.x, e, first, m)) return;
  const bool null_tile = e == E;  // block-uniform: zero rows
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kColumns;
  stage_expand_pairs(order, first, m, K, slot, pair_scale, scaling, pair, scale);
  __syncthreads();
  const scalar_t* We = W + (null_tile ? 0 : e * ws_e);
  const scalar_t zero = from_acc<scalar_t>(0.f);
  const bool columns_fast = ws_c == 1;  // walk W along its contiguous dimension
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float acc[kColumns / 8][4] = {};
  for (int r0 = 0; r0 < (null_tile ? 0 : R); r0 += kRankChunk) {
    for (int idx = threadIdx.x; idx < kPairTile * kRankChunk; idx += kTcThreads) {
      const int i = idx / kRankChunk, rr = idx % kRankChunk;
      cs[i][rr] = (pair[i] >= 0 && r0 + rr < R) ? from_acc<scalar_t>(coef[pair[i] * R + r0 + rr])
                                                : zero;
    }
    for (int idx = threadIdx.x; idx < kColumns * kRankChunk; idx += kTcThreads) {
      const int cc = columns_fast ? idx % kColumns : idx / kRankChunk;
      const int rr = columns_fast ? idx / kColumns : idx % kRankChunk;
      wsm[cc][rr] = (c0 + cc < n && r0 + rr < R) ? We[(c0 + cc) * ws_c + (r0 + rr) * ws_r] : zero;
    }
    __syncthreads();
    uint32_t a[4];
    ldmatrix<4>(a, &cs[warp * 16 + lane % 16][8 * (lane / 16)]);
#pragma unroll
    for (int j = 0; j < kColumns / 8; j += 2) {
      uint32_t b[4];
      ldmatrix<4>(b, &wsm[8 * j + 8 * (lane / 16) + lane % 8][8 * (lane / 8 % 2)]);
      const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
      mma_m16n8k16<scalar_t>(acc[j], a, b0, acc[j]);
      mma_m16n8k16<scalar_t>(acc[j + 1], a, b1, acc[j + 1]);
    }
    __syncthreads();  // the next chunk overwrites cs and wsm
  }
  // acc[j][i]: pair row 16 warp + lane / 4 + 8 (i / 2), column c0 + 8 j + 2 (lane % 4) + i % 2.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = warp * 16 + lane / 4 + 8 * (i / 2);
    const int64_t p = pair[row];
    if (p < 0) continue;
#pragma unroll
    for (int j = 0; j < kColumns / 8; ++j) {
      const int64_t c = c0 + 8 * j + 2 * (lane % 4) + i % 2;
      if (c < n) expand_store(out, p, K, slot, n, c, acc[j][i] * scale[row]);  // s w on fp32
    }
  }
}

// The weight-gradient chunk map, int32 (3, E + 1): chunk_start (chunks of the experts
// before e; an expert has max(1, ceil(count / chunk)) chunks, so an unchosen one still
// writes its zeros), spill_start (partial slots of the experts before e, counting only
// experts of several chunks) and multi_start (experts of several chunks before e).
__device__ __forceinline__ int64_t grad_chunks(const int64_t* offsets, int64_t e, int64_t chunk) {
  const int64_t count = offsets[e + 1] - offsets[e];
  return count > chunk ? (count + chunk - 1) / chunk : 1;
}

__global__ void grad_chunk_map_kernel(const int64_t* __restrict__ offsets, int64_t E,
                                      int64_t chunk, int32_t* __restrict__ map) {
  block_offsets([=](int64_t e) { return grad_chunks(offsets, e, chunk); }, E, map);
  block_offsets([=](int64_t e) {
    const int64_t c = grad_chunks(offsets, e, chunk);
    return c > 1 ? c : int64_t(0);
  }, E, map + (E + 1));
  block_offsets([=](int64_t e) { return int64_t(grad_chunks(offsets, e, chunk) > 1); }, E,
                map + 2 * (E + 1));
}

// A weight-gradient block's chunk: expert e, its chunk index, its pairs [begin, end) of
// `order`, and whether it is e's only chunk (G_e straight to out; else an acc partial in
// spill slot spill_start[e] + chunk).
struct GradChunk {
  int64_t e, chunk, begin, end;
  bool alone;
};

// Block blockIdx.x -> its chunk; false for blocks past the last chunk.
__device__ __forceinline__ bool locate_grad_chunk(const int32_t* map, const int64_t* offsets,
                                                  int64_t E, int64_t pairs_per_chunk,
                                                  GradChunk& g) {
  const int32_t* chunk_start = map;
  if (blockIdx.x >= chunk_start[E]) return false;
  g.e = find_bin(chunk_start, E, blockIdx.x);
  g.chunk = blockIdx.x - chunk_start[g.e];
  g.begin = offsets[g.e] + g.chunk * pairs_per_chunk;
  g.end = min64(offsets[g.e + 1], g.begin + pairs_per_chunk);
  g.alone = chunk_start[g.e + 1] - chunk_start[g.e] == 1;
  return true;
}

// Block (chunk, column block blockIdx.y); thread (rank row tid / 16, columns tid % 16 +
// 16 * q). The chunk's pairs stream through shared memory kGradPairs at a time.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
weight_grad_kernel(const acc_of<scalar_t>* __restrict__ coef,
                   const acc_of<scalar_t>* __restrict__ pair_scale, acc_of<scalar_t> scaling,
                   const scalar_t* __restrict__ rows, int64_t n, const int64_t* __restrict__ order,
                   const int64_t* __restrict__ offsets, const int32_t* __restrict__ map,
                   int64_t pairs_per_chunk, const int64_t* __restrict__ experts, int64_t E,
                   int64_t K, int R,
                   acc_of<scalar_t>* __restrict__ spill, scalar_t* __restrict__ out, int64_t os_e,
                   int64_t os_r, int64_t os_c) {
  using acc_t = acc_of<scalar_t>;
  static_assert(kRankChunk * 16 == kThreads && kColumns == 16 * 8, "layout");
  __shared__ acc_t rs[kGradPairs][kColumns];
  __shared__ acc_t sc[kGradPairs][kRankChunk + 1];
  __shared__ int64_t tok[kGradPairs];
  GradChunk g;
  if (!locate_grad_chunk(map, offsets, E, pairs_per_chunk, g)) return;
  const int32_t* spill_start = map + (E + 1);
  const int64_t e = g.e, begin = g.begin, end = g.end;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kColumns;
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
        if (c >= n) continue;
        if (g.alone) out[e * os_e + r * os_r + c * os_c] = from_acc<scalar_t>(acc[q]);
        else spill[((spill_start[e] + g.chunk) * R + r) * n + c] = acc[q];
      }
    }
  }
}

// The same weight gradient on tensor cores, for __half / __nv_bfloat16. Per rank chunk,
// G_e[r0:r0+16, c0:c0+128] = S^T Rows: an mma_m16n8k16 GEMM whose M is the 16 rank rows,
// N the block's 128 columns (warp w owns columns 32w..32w+31, four n8 tiles) and K the
// chunk's pairs, kGradTcPairs per stage, double-buffered. S (pairs x 16, stored rank-major
// as the row-major A) holds scale_p coef[p, r0:r0+16], the product taken in fp32 and
// rounded to the data dtype for the mma, as the expand rounds its coef (the scale_p of a
// pair cannot move to the epilogue here: the pairs are the reduction dimension); the
// gathered rows are the k-major B (ldmatrix .trans), arriving by cp.async (16-byte chunks,
// when `aligned`: n % 8 == 0 and rows 16-byte aligned) or by plain loads. Pairs of other
// experts (bad ids) and past the chunk get zero coefficients and zero rows. Accumulation in
// fp32 registers; the epilogue writes G_e or the chunk's fp32 partial, as the SIMT kernel.
constexpr int kGradTcPairs = 64;                // pairs per stage: four k16 steps
constexpr int kGradTcPairPad = kGradTcPairs + 8;  // S rows of 144 bytes: distinct banks
constexpr int kGradTcColPad = kColumns + 8;     // gathered rows of 272 bytes: distinct banks

template <typename scalar_t>
__global__ void __launch_bounds__(kTcThreads)
weight_grad_tc_kernel(const float* __restrict__ coef, const float* __restrict__ pair_scale,
                      float scaling, const scalar_t* __restrict__ rows, int64_t n, bool aligned,
                      const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                      const int32_t* __restrict__ map, int64_t pairs_per_chunk,
                      const int64_t* __restrict__ experts, int64_t E, int64_t K, int R,
                      float* __restrict__ spill, scalar_t* __restrict__ out, int64_t os_e,
                      int64_t os_r, int64_t os_c) {
  static_assert(kColumns == 32 * (kTcThreads / 32) && kRankChunk == 16, "warp tiles");
  static_assert(kGradTcPairs <= kTcThreads && kGradTcPairs % 16 == 0, "stage");
  __shared__ __align__(16) scalar_t ss[2][kRankChunk][kGradTcPairPad];  // S^T: (rank, pair)
  __shared__ __align__(16) scalar_t rs[2][kGradTcPairs][kGradTcColPad];  // (pair, column)
  __shared__ int64_t tok[2][kGradTcPairs];  // the pair's row offset in rows, -1: zero row
  GradChunk g;
  if (!locate_grad_chunk(map, offsets, E, pairs_per_chunk, g)) return;
  const int32_t* spill_start = map + (E + 1);
  const int64_t e = g.e, begin = g.begin, end = g.end;
  const int stages = static_cast<int>((end - begin + kGradTcPairs - 1) / kGradTcPairs);
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kColumns;
  const scalar_t zero = from_acc<scalar_t>(0.f);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r0 = 0; r0 < R; r0 += kRankChunk) {
    // Stage s's pairs (threads < kGradTcPairs, one pair each): tok and the column of S.
    auto stage_pairs = [&](int buf, int s) {
      const int i = threadIdx.x;
      if (i >= kGradTcPairs) return;
      const int64_t at = begin + static_cast<int64_t>(s) * kGradTcPairs + i;
      const int64_t p = at < end ? order[at] : -1;
      const bool mine = p >= 0 && experts[p] == e;  // bad ids in this bin add nothing
      const float sp = mine && pair_scale ? scaling * pair_scale[p] : 1.f;
      tok[buf][i] = mine ? (p / K) * n : -1;
      for (int rr = 0; rr < kRankChunk; ++rr)
        ss[buf][rr][i] =
            mine && r0 + rr < R ? from_acc<scalar_t>(sp * coef[p * R + r0 + rr]) : zero;
    };
    // Stage s's gathered rows (every thread; reads tok[buf], so after a barrier).
    auto stage_rows = [&](int buf) {
      if (aligned) {
#pragma unroll 2
        for (int idx = threadIdx.x; idx < kGradTcPairs * (kColumns / 8); idx += kTcThreads) {
          const int i = idx / (kColumns / 8), cc = (idx % (kColumns / 8)) * 8;
          const bool ok = tok[buf][i] >= 0 && c0 + cc < n;
          cp_async_16(&rs[buf][i][cc], ok ? rows + tok[buf][i] + c0 + cc : rows, ok ? 16 : 0);
        }
        cp_async_commit();
      } else {
#pragma unroll 4
        for (int idx = threadIdx.x; idx < kGradTcPairs * kColumns; idx += kTcThreads) {
          const int i = idx / kColumns, cc = idx % kColumns;
          rs[buf][i][cc] = tok[buf][i] >= 0 && c0 + cc < n ? rows[tok[buf][i] + c0 + cc] : zero;
        }
      }
    };
    float acc[4][4] = {};
    if (stages > 0) {
      stage_pairs(0, 0);
      __syncthreads();  // tok[0] is written
      stage_rows(0);
    }
    for (int s = 0; s < stages; ++s) {
      const int buf = s % 2;
      if (s + 1 < stages) stage_pairs(buf ^ 1, s + 1);
      if (aligned) cp_async_wait<0>();  // this thread's copies of stage s have landed
      __syncthreads();  // every thread's rows of stage s landed; tok[buf ^ 1] is written
      if (s + 1 < stages) stage_rows(buf ^ 1);  // in flight while stage s feeds the mma
#pragma unroll
      for (int kk = 0; kk < kGradTcPairs; kk += 16) {
        uint32_t a[4];
        ldmatrix<4>(a, &ss[buf][lane % 16][kk + 8 * (lane / 16)]);
#pragma unroll
        for (int j = 0; j < 4; j += 2) {
          uint32_t b[4];  // k-major rows: matrices (k 0-7, k 8-15) x (n tile j, j + 1)
          ldmatrix<4, true>(b, &rs[buf][kk + lane % 8 + 8 * (lane / 8 % 2)]
                                  [32 * warp + 8 * j + 8 * (lane / 16)]);
          const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
          mma_m16n8k16<scalar_t>(acc[j], a, b0, acc[j]);
          mma_m16n8k16<scalar_t>(acc[j + 1], a, b1, acc[j + 1]);
        }
      }
      __syncthreads();  // stage s is consumed before stage s + 2 overwrites its buffers
    }
    // acc[j][i]: rank r0 + lane / 4 + 8 (i / 2), column c0 + 32 warp + 8 j + 2 (lane % 4) + i % 2.
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = r0 + lane / 4 + 8 * (i / 2);
        const int64_t c = c0 + 32 * warp + 8 * j + 2 * (lane % 4) + i % 2;
        if (r >= R || c >= n) continue;
        if (g.alone) out[e * os_e + r * os_r + c * os_c] = from_acc<scalar_t>(acc[j][i]);
        else spill[((spill_start[e] + g.chunk) * R + r) * n + c] = acc[j][i];
      }
  }
}

// Block (the i-th expert of several chunks, element blocks): G_e = its partials (R, n)
// added in chunk order.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
weight_grad_reduce_kernel(const acc_of<scalar_t>* __restrict__ spill,
                          const int32_t* __restrict__ map, int64_t E, int R, int64_t n,
                          scalar_t* __restrict__ out, int64_t os_e, int64_t os_r, int64_t os_c) {
  using acc_t = acc_of<scalar_t>;
  const int32_t* spill_start = map + (E + 1);
  const int32_t* multi_start = map + 2 * (E + 1);
  if (blockIdx.x >= multi_start[E]) return;
  const int64_t e = find_bin(multi_start, E, blockIdx.x);
  const int64_t size = R * n;
  for (int64_t idx = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; idx < size;
       idx += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    acc_t s = 0;
    for (int64_t slot = spill_start[e]; slot < spill_start[e + 1]; ++slot) s += spill[slot * size + idx];
    const int64_t r = idx / n, c = idx % n;
    out[e * os_e + r * os_r + c * os_c] = from_acc<scalar_t>(s);
  }
}

}  // namespace

cudaError_t launch_tile_map(const int64_t* offsets, int64_t num_bins, int32_t* tile_start,
                            cudaStream_t stream) {
  launch_kernel<tile_map_kernel>(1, kScanThreads, 0, stream, offsets, num_bins, tile_start);
  return cudaGetLastError();
}

cudaError_t launch_grouped_shrink(DType dtype, const void* vecs, int64_t n, ExpertWeights W,
                                  const int64_t* order, const int64_t* offsets,
                                  const int32_t* tile_start, const int64_t* experts, int64_t P,
                                  int64_t E, int64_t K, int64_t R, const PairGrads* grads,
                                  void* out, cudaStream_t stream) {
  if (P == 0) return cudaGetLastError();
  dispatch_all(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    const ShrinkGrads<acc_t> g =
        grads ? ShrinkGrads<acc_t>{static_cast<const acc_t*>(grads->h),
                                   static_cast<const acc_t*>(grads->w),
                                   static_cast<acc_t>(grads->scaling), static_cast<acc_t*>(grads->dw)}
              : ShrinkGrads<acc_t>{nullptr, nullptr, acc_t(0), nullptr};
    const auto args = std::make_tuple(static_cast<const scalar_t*>(vecs), n,
                                      static_cast<const scalar_t*>(W.data), W.stride_e, W.stride_i,
                                      W.stride_j, order, offsets, tile_start, experts, E, K,
                                      static_cast<int>(R), g, static_cast<acc_t*>(out));
    const unsigned grid = static_cast<unsigned>(max_pair_tiles(P, E + 1));
    if constexpr (sizeof(scalar_t) == 2) {  // __half, __nv_bfloat16: tensor cores
      const bool aligned = n % 8 == 0 && reinterpret_cast<uintptr_t>(vecs) % 16 == 0;
      std::apply([&](auto v, auto n_, auto... rest) {
        if (grads)
          launch_kernel<grouped_shrink_tc_kernel<scalar_t, true>>(grid, kTcThreads, 0, stream, v,
                                                                  n_, aligned, rest...);
        else
          launch_kernel<grouped_shrink_tc_kernel<scalar_t, false>>(grid, kTcThreads, 0, stream, v,
                                                                   n_, aligned, rest...);
      }, args);
    } else {
      std::apply([&](auto... a) {
        if (grads) launch_kernel<grouped_shrink_kernel<scalar_t, true>>(grid, kThreads, 0, stream, a...);
        else launch_kernel<grouped_shrink_kernel<scalar_t, false>>(grid, kThreads, 0, stream, a...);
      }, args);
    }
  });
  return cudaGetLastError();
}

cudaError_t launch_grouped_expand(DType dtype, const void* coef, const void* pair_scale,
                                  double scaling, ExpertWeights W, int64_t n,
                                  const int64_t* order, const int64_t* offsets,
                                  const int32_t* tile_start, int64_t T, int64_t E, int64_t K,
                                  int64_t R, void* out, cudaStream_t stream) {
  if (T * K == 0 || n == 0) return cudaGetLastError();
  const dim3 grid(static_cast<unsigned>(max_pair_tiles(T * K, E + 1)), blocks_for(n, kColumns));
  dispatch_all(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    for (int64_t slot = 0; slot < K; ++slot) {  // in k order: slot k adds to slots 0..k-1
      const auto args = std::make_tuple(
          static_cast<const acc_t*>(coef), static_cast<const acc_t*>(pair_scale),
          static_cast<acc_t>(scaling), static_cast<const scalar_t*>(W.data), W.stride_e,
          W.stride_i, W.stride_j, n, order, offsets, tile_start, E, K, slot,
          static_cast<int>(R), static_cast<scalar_t*>(out));
      std::apply([&](auto... a) {
        if constexpr (sizeof(scalar_t) == 2)  // __half, __nv_bfloat16: tensor cores
          launch_kernel<grouped_expand_tc_kernel<scalar_t>>(grid, kTcThreads, 0, stream, a...);
        else
          launch_kernel<grouped_expand_kernel<scalar_t>>(grid, kThreads, 0, stream, a...);
      }, args);
    }
  });
  return cudaGetLastError();
}

cudaError_t launch_grad_chunk_map(const int64_t* offsets, int64_t P, int64_t E, int32_t* map,
                                  cudaStream_t stream) {
  launch_kernel<grad_chunk_map_kernel>(1, kScanThreads, 0, stream, offsets, E,
                                       grad_chunk_pairs(P), map);
  return cudaGetLastError();
}

cudaError_t launch_weight_grad(DType dtype, const void* coef, const void* pair_scale,
                               double scaling, const void* rows, int64_t n, const int64_t* order,
                               const int64_t* offsets, const int32_t* chunk_map,
                               const int64_t* experts, int64_t P, int64_t E, int64_t K, int64_t R,
                               void* spill, void* out, int64_t out_stride_e, int64_t out_stride_r,
                               int64_t out_stride_c, cudaStream_t stream) {
  if (E == 0 || n == 0 || R == 0) return cudaGetLastError();
  const dim3 grid(static_cast<unsigned>(max_grad_chunks(P, E)), blocks_for(n, kColumns));
  const dim3 reduce_grid(static_cast<unsigned>(max_grad_multi_experts(P)),
                         static_cast<unsigned>(min64(blocks_for(R * n, kThreads), 1024)));
  dispatch_all(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    if constexpr (sizeof(scalar_t) == 2) {  // __half, __nv_bfloat16: tensor cores
      const bool aligned = n % 8 == 0 && reinterpret_cast<uintptr_t>(rows) % 16 == 0;
      launch_kernel<weight_grad_tc_kernel<scalar_t>>(grid, kTcThreads, 0, stream,
          static_cast<const float*>(coef), static_cast<const float*>(pair_scale),
          static_cast<float>(scaling), static_cast<const scalar_t*>(rows), n, aligned, order,
          offsets, chunk_map, grad_chunk_pairs(P), experts, E, K, static_cast<int>(R),
          static_cast<float*>(spill), static_cast<scalar_t*>(out), out_stride_e, out_stride_r,
          out_stride_c);
    } else {
      launch_kernel<weight_grad_kernel<scalar_t>>(grid, kThreads, 0, stream,
          static_cast<const acc_t*>(coef), static_cast<const acc_t*>(pair_scale),
          static_cast<acc_t>(scaling), static_cast<const scalar_t*>(rows), n, order, offsets,
          chunk_map, grad_chunk_pairs(P), experts, E, K, static_cast<int>(R),
          static_cast<acc_t*>(spill),
          static_cast<scalar_t*>(out), out_stride_e, out_stride_r, out_stride_c);
    }
    launch_kernel<weight_grad_reduce_kernel<scalar_t>>(reduce_grid, kThreads, 0, stream,
        static_cast<const acc_t*>(spill), chunk_map, E, static_cast<int>(R), n,
        static_cast<scalar_t*>(out), out_stride_e, out_stride_r, out_stride_c);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace moe_ext
