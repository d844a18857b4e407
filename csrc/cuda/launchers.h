// The plain C++ interface between the tensor-level CUDA ops (csrc/cuda/*_cuda.cpp: checks,
// allocation, dtype choice) and the kernels (csrc/cuda/*.cu: raw pointers and a stream, no
// torch headers, so they build fast). Each launcher enqueues its kernels on `stream` and
// returns cudaGetLastError(); nothing here synchronises with the host.
//
// Notation (docs/architecture.md#notation): T tokens, D/O in/out features, E LoRA experts, N null experts,
// M = E + N router outputs, K experts per token, R LoRA rank, P = T * K pairs; pair p is
// (token p / K, slot p % K). "acc" is float64 for float64 data and float32 otherwise.
#pragma once
#if defined(MOE_EXT_CPU_MODEL)
#include "cpu_model/runtime.h"  // the tests' CPU execution model (cuda_api.cuh)
#else
#include <cuda_runtime_api.h>
#endif

#include <cstdint>

namespace moe_ext {
namespace cuda {

enum class DType { kFloat64, kFloat32, kFloat16, kBFloat16 };

// ---- routing (route.cu)
// logits (T, M) in `dtype`; bias (M,) acc or null; probs (T, M), weights (T, K) acc;
// experts (T, K); counts (M,) must be zero on entry.
cudaError_t launch_route(DType dtype, const void* logits, const void* bias, int64_t T, int64_t M,
                         int64_t K, double inv_tau, bool normalize, void* probs, void* weights,
                         int64_t* experts, int64_t* counts, cudaStream_t stream);
// All acc (`dtype` is kFloat64 or kFloat32); grad_probs may be null; out (T, M).
cudaError_t launch_route_backward(DType dtype, const void* grad_probs, const void* grad_weights,
                                  const void* probs, const void* weights, const int64_t* experts,
                                  int64_t T, int64_t M, int64_t K, double inv_tau, bool normalize,
                                  void* out, cudaStream_t stream);

// ---- alignment (align.cu): stable counting sort of P ids into num_bins bins.
// Ids outside [0, num_bins) are counted in the last bin (the grouped LoRA kernels check
// experts[p] against the bin and skip them); the host checks ids only in debug mode, as
// the check needs a sync.
int64_t align_scratch_ints(int64_t P, int64_t num_bins);  // int32 scratch elements needed
cudaError_t launch_align(const int64_t* ids, int64_t P, int64_t num_bins, int32_t* scratch,
                         int64_t* order, int64_t* offsets, cudaStream_t stream);

// ---- sparse grouped LoRA (lora.cu), over tiles of kPairTile pairs of one bin: the pairs
// are aligned into E + 1 bins (order, offsets (E + 2,)), bin E holding every null pair.
// tile_start (num_bins + 1,): tile_start[b] = sum over b' < b of ceil(count_b' / kPairTile),
// counts from offsets. The grouped kernels take tile_map(offsets, E + 1) and launch
// max_pair_tiles(P, E + 1) blocks.
constexpr int kPairTile = 64;
inline int64_t max_pair_tiles(int64_t P, int64_t num_bins) {
  return (P + kPairTile - 1) / kPairTile + num_bins;
}
cudaError_t launch_tile_map(const int64_t* offsets, int64_t num_bins, int32_t* tile_start,
                            cudaStream_t stream);
// Expert weights are read through strides so that one kernel serves A (E, R, D) and
// B (E, O, R) in either orientation: W_e[i, j] at W[e * stride_e + i * stride_i + j * stride_j].
struct ExpertWeights {
  const void* data;
  int64_t stride_e, stride_i, stride_j;
};
// The backward's per-pair gradients, fused into the shrink of dy (all acc): h (P, R) the
// forward's shrink, w (P,) the routing weights, dw (P,) the output.
struct PairGrads {
  const void* h;
  const void* w;
  double scaling;
  void* dw;
};
// gh[p, r] = sum_c W_e[r, c] * vecs[p / K, c] for every pair p of LoRA expert e < E and
// 0 for the null pairs (bin E). grads null: out = gh (forward h = A x). Otherwise (backward,
// gh = B^T dy): out = dh[p] = scaling * w[p] * gh[p] and dw[p] = scaling * <gh[p], h[p]>
// (0 for null pairs). Pairs in a bin that is not theirs (bad ids, a wrong alignment) are
// skipped. vecs (T, n) in `dtype`, out (P, R) acc.
cudaError_t launch_grouped_shrink(DType dtype, const void* vecs, int64_t n, ExpertWeights W,
                                  const int64_t* order, const int64_t* offsets,
                                  const int32_t* tile_start, const int64_t* experts, int64_t P,
                                  int64_t E, int64_t K, int64_t R, const PairGrads* grads,
                                  void* out, cudaStream_t stream);
// The expand, in `dtype`, one launch per slot k in k order: out[t, c] = sum over k of
// sum_r coef[p, r] * scale_p * W_e[c, r] for the pairs p = (t, k), c < n (null pairs add 0),
// with scale_p = scaling * pair_scale[p] (or 1 when pair_scale is null). Slot 0 writes
// out (T, n), slot k > 0 adds to it: the K-combine in k order, in place, no buffer.
// coef (P, R) acc.
cudaError_t launch_grouped_expand(DType dtype, const void* coef, const void* pair_scale,
                                  double scaling, ExpertWeights W, int64_t n,
                                  const int64_t* order, const int64_t* offsets,
                                  const int32_t* tile_start, int64_t T, int64_t E, int64_t K,
                                  int64_t R, void* out, cudaStream_t stream);
// Weight gradients go per (expert, chunk of grad_chunk_pairs(P) pairs), so that one expert
// with many pairs spreads over many blocks; experts of several chunks leave acc partials in
// `spill` (max_grad_spill_slots(P) * R * n elements, at most 257 slots: the chunk grows
// past 512 pairs with P) that a second kernel adds in chunk order.
// chunk_map: int32 (3 * (E + 1),) from launch_grad_chunk_map(offsets, P, E).
constexpr int64_t kGradChunk = 512;
inline int64_t grad_chunk_pairs(int64_t P) {
  return (P + 127) / 128 > kGradChunk ? (P + 127) / 128 : kGradChunk;
}
inline int64_t max_grad_chunks(int64_t P, int64_t E) { return P / grad_chunk_pairs(P) + E; }
inline int64_t max_grad_multi_experts(int64_t P) { return P / (grad_chunk_pairs(P) + 1) + 1; }
inline int64_t max_grad_spill_slots(int64_t P) { return 2 * P / grad_chunk_pairs(P) + 1; }
cudaError_t launch_grad_chunk_map(const int64_t* offsets, int64_t P, int64_t E,
                                  int32_t* chunk_map, cudaStream_t stream);
// Weight gradient of every LoRA expert e < E:
//   G_e[r, c] = sum over e's pairs p (in order) of coef[p, r] * scale_p * rows[p / K, c],
// written to out[e * out_stride_e + r * out_stride_r + c * out_stride_c] in `dtype`.
// coef (P, R) acc, rows (T, n) in `dtype`; scale_p as in launch_grouped_expand; pairs
// with experts[p] != e (bad ids) add nothing.
cudaError_t launch_weight_grad(DType dtype, const void* coef, const void* pair_scale,
                               double scaling, const void* rows, int64_t n, const int64_t* order,
                               const int64_t* offsets, const int32_t* chunk_map,
                               const int64_t* experts, int64_t P, int64_t E, int64_t K, int64_t R,
                               void* spill, void* out, int64_t out_stride_e, int64_t out_stride_r,
                               int64_t out_stride_c, cudaStream_t stream);

// ---- dense-gated strategy (lora_dense.cu). x (T, D), lora_A (E, R, D) = A_all (E*R, D),
// lora_B (E, O, R), y (T, O), h_all (T, E*R) in `dtype`; w (T, K) acc; experts (T, K).
// gate(t, e) = scaling * (sum of token t's weights on LoRA expert e, in k order).
//
// Fused forward on tensor cores: h_all = x A_all^T and y = gate(h_all) B_all^T in one
// kernel, for the shapes dense_fused_supported accepts (bf16 / fp16, E*R <= 256, R, D, O
// multiples of 8; every pointer 16-byte aligned, which the caller checks).
constexpr int64_t kDenseFusedMaxWidth = 256;
bool dense_fused_supported(DType dtype, int64_t T, int64_t D, int64_t O, int64_t E, int64_t R,
                           int64_t K);
// The same without D: what lora_dense_expand's kernels (below) take.
bool dense_expand_supported(DType dtype, int64_t T, int64_t O, int64_t E, int64_t R, int64_t K);
// Dynamic shared memory the fused kernels of width E*R need (forward and backward, the
// largest): the host uses the cuBLAS path on a device whose opt-in limit is smaller
// (sm_86 / sm_89 allow 99 KB per block, sm_80 / sm_90 163 / 227 KB).
size_t dense_fused_shared_bytes(int64_t ER);
cudaError_t launch_lora_dense_fused_forward(DType dtype, const void* x, const void* A,
                                            const void* B, const void* w, const int64_t* experts,
                                            int64_t T, int64_t D, int64_t O, int64_t E, int64_t R,
                                            int64_t K, double scaling, void* y, void* h_all,
                                            cudaStream_t stream);
// Fused backward on tensor cores, same shapes: kernel 1 per 64 tokens dy -> d_gated = dy
// B_all -> dw, dh = gate * d_gated -> dx = dh A_all (also writing dh and gated = gate * h,
// (T, E*R) scratch in `dtype`, without the scaling, which the fused kernels apply only to
// fp32 results); kernel 2 [dA_all | dB_all^T] = [dh^T x | gated^T dy] over
// dense_backward_splits(T) token splits into `partial` (splits, E*R, D + O) fp32, then a
// reduction in split order into dA (E, R, D) and dB (E, O, R). h_all is what
// lora_dense_forward returned; dw (T, K) fp32.
constexpr int kDenseMaxSplits = 4;
int dense_backward_splits(int64_t T);  // 1 .. kDenseMaxSplits, from T only: deterministic
struct DenseBackwardArgs {
  const void *grad_y, *x, *A, *B, *h_all, *w;
  const int64_t* experts;
  int64_t T, D, O, E, R, K;
  double scaling;
  void *dx, *dw, *dA, *dB, *dh, *gated, *partial;
};
cudaError_t launch_lora_dense_fused_backward(DType dtype, const DenseBackwardArgs& args,
                                             cudaStream_t stream);
// lora_dense_expand on the same kernels, from a given h_all (T, E*R): the fused forward
// without its shrink, y = gate(h_all) B_all^T; and the fused backward without dx and dA
// (args.x, A, dx, dA are ignored, `partial` is (splits, E*R, O)), writing dh = s * gate *
// d_gated (the op's grad_h_all), dw, dB and the gated scratch.
cudaError_t launch_lora_dense_expand_forward(DType dtype, const void* h_all, const void* B,
                                             const void* w, const int64_t* experts, int64_t T,
                                             int64_t O, int64_t E, int64_t R, int64_t K,
                                             double scaling, void* y, cudaStream_t stream);
cudaError_t launch_lora_dense_expand_backward(DType dtype, const DenseBackwardArgs& args,
                                              cudaStream_t stream);
// Generic path, around cuBLAS GEMMs: out[t, e*R + r] = gate(t, e) * in[t, e*R + r] over
// (T, E*R) in `dtype` (the mask in forward, and its gradient to h_all in backward).
cudaError_t launch_dense_gate(DType dtype, const void* in, const void* w, const int64_t* experts,
                              int64_t T, int64_t E, int64_t R, int64_t K, double scaling,
                              void* out, cudaStream_t stream);
// grad_w[t, k] = scaling * <d_gated[t, e*R : (e+1)*R], h_all[t, e*R : (e+1)*R]>, 0 for null
// experts. d_gated, h_all (T, E*R) in `dtype`; grad_w (T, K) acc.
cudaError_t launch_dense_gate_grad_w(DType dtype, const void* d_gated, const void* h_all,
                                     const int64_t* experts, int64_t T, int64_t E, int64_t R,
                                     int64_t K, double scaling, void* grad_w, cudaStream_t stream);

}  // namespace cuda
}  // namespace moe_ext
