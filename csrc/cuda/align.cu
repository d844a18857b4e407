// CUDA stable counting sort of the P (token, k) pairs by expert id, without atomics and
// without host synchronisation:
//   1. count: one warp per chunk of kChunk pairs counts its ids into hist[bin][chunk]
//      (a warp owns its column, so plain read-modify-writes suffice; __match_any_sync
//      groups equal ids of a round of 32).
//   2. scan_chunks: one warp per bin turns its row into exclusive prefixes over the chunks
//      and writes the bin total.
//   3. scan_bins: one block turns the bin totals into offsets.
//   4. scatter: the warps of step 1 replay their chunks and place each pair at
//      offsets[bin] + hist[bin][chunk] + its rank among equal ids before it.
// Order inside a bin follows the pair index (stable), so the result is deterministic.
#include "common.cuh"

namespace moe_ext {
namespace cuda {
namespace {

constexpr int64_t kChunk = 256;   // pairs per warp
constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ int bin_of(int64_t id, int64_t num_bins) {
  return static_cast<int>(is_lora(id, num_bins) ? id : num_bins - 1);
}

__global__ void align_count_kernel(const int64_t* __restrict__ ids, int64_t P, int num_bins,
                                   int64_t C, int32_t* __restrict__ hist) {
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (c >= C) return;
  const int64_t end = min64(P, (c + 1) * kChunk);
  for (int64_t i0 = c * kChunk; i0 < end; i0 += 32) {
    const int64_t i = i0 + lane;
    const bool valid = i < end;
    const unsigned active = __ballot_sync(kFullMask, valid);
    if (valid) {
      const int b = bin_of(ids[i], num_bins);
      const unsigned peers = __match_any_sync(active, b);
      if (lane == __ffs(peers) - 1) hist[b * C + c] += __popc(peers);
    }
    __syncwarp();
  }
}

__global__ void align_scan_chunks_kernel(int32_t* __restrict__ hist, int num_bins, int64_t C,
                                         int64_t* __restrict__ totals) {
  const int lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (b >= num_bins) return;
  int32_t* row = hist + b * C;
  int64_t carry = 0;
  for (int64_t c0 = 0; c0 < C; c0 += 32) {
    const int64_t c = c0 + lane;
    const int64_t v = c < C ? row[c] : 0;
    int64_t inclusive = v;
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t up = __shfl_up_sync(kFullMask, inclusive, o);
      if (lane >= o) inclusive += up;
    }
    if (c < C) row[c] = static_cast<int32_t>(carry + inclusive - v);
    carry += __shfl_sync(kFullMask, inclusive, 31);
  }
  if (lane == 0) totals[b] = carry;
}

__global__ void align_scan_bins_kernel(const int64_t* __restrict__ totals, int num_bins,
                                       int64_t* __restrict__ offsets) {
  block_offsets([totals](int64_t b) { return totals[b]; }, num_bins, offsets);
}

__global__ void align_scatter_kernel(const int64_t* __restrict__ ids, int64_t P, int num_bins,
                                     int64_t C, int32_t* __restrict__ hist,
                                     const int64_t* __restrict__ offsets,
                                     int64_t* __restrict__ order) {
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (c >= C) return;
  const unsigned lower_lanes = (1u << lane) - 1;
  const int64_t end = min64(P, (c + 1) * kChunk);
  for (int64_t i0 = c * kChunk; i0 < end; i0 += 32) {
    const int64_t i = i0 + lane;
    const bool valid = i < end;
    const unsigned active = __ballot_sync(kFullMask, valid);
    int b = 0;
    unsigned peers = 0;
    if (valid) {
      b = bin_of(ids[i], num_bins);
      peers = __match_any_sync(active, b);
      order[offsets[b] + hist[b * C + c] + __popc(peers & lower_lanes)] = i;
    }
    __syncwarp();  // every peer has read hist[b][c] before the leader advances it
    if (valid && lane == __ffs(peers) - 1) hist[b * C + c] += __popc(peers);
    __syncwarp();
  }
}

int64_t num_chunks(int64_t P) { return (P + kChunk - 1) / kChunk; }

}  // namespace

// hist (num_bins x chunks) then the bin totals, as int64 stored in pairs of int32.
int64_t align_scratch_ints(int64_t P, int64_t num_bins) {
  return num_bins * num_chunks(P) + 2 * num_bins + 2;
}

cudaError_t launch_align(const int64_t* ids, int64_t P, int64_t num_bins, int32_t* scratch,
                         int64_t* order, int64_t* offsets, cudaStream_t stream) {
  const int64_t C = num_chunks(P);
  const int bins = static_cast<int>(num_bins);
  int32_t* hist = scratch;
  // Totals start at the first 8-byte boundary after hist.
  int64_t* totals = reinterpret_cast<int64_t*>(scratch + ((num_bins * C + 1) & ~int64_t(1)));
  cudaError_t err = cudaMemsetAsync(hist, 0, sizeof(int32_t) * num_bins * C, stream);
  if (err != cudaSuccess) return err;
  const int threads = kWarpsPerBlock * 32;
  if (C > 0)
    launch_kernel<align_count_kernel>(blocks_for(C, kWarpsPerBlock), threads, 0, stream, ids, P,
                                      bins, C, hist);
  launch_kernel<align_scan_chunks_kernel>(blocks_for(num_bins, kWarpsPerBlock), threads, 0,
                                          stream, hist, bins, C, totals);
  launch_kernel<align_scan_bins_kernel>(1, kScanThreads, 0, stream, totals, bins, offsets);
  if (C > 0)
    launch_kernel<align_scatter_kernel>(blocks_for(C, kWarpsPerBlock), threads, 0, stream, ids, P,
                                        bins, C, hist, offsets, order);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace moe_ext
